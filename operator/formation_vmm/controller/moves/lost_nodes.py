"""VMs of a node given up for lost start on other nodes, where their owners allow it.

A node is given up when an admin says it will not come back (the Node deleted, or tainted
``node.kubernetes.io/out-of-service``) and its agent is silent past ``node_lost_seconds``;
silence alone never is (a node cut off from the API may still run its guests). Each VM whose
evictionStrategy is not None and whose ``spec.allowDiskLoss`` is true is bound to another node
in one write (``Binder.move_binding``); a VM that waits says why in its eviction annotation.
Objects deleted while their node is lost lose that node's agent finalizer, which no agent would
remove, as Kubernetes' pod GC ends the pods of a deleted Node (docs/migration.md)."""

import logging
import time
from typing import Any

from formation_vmm.api.models import VirtualMachine, VirtualMachineStatus, VmRestoreStatus, VmSnapshotStatus
from formation_vmm.api.names import (
    EVICTION_ANNOTATION,
    NODE_LABEL,
    RESTART_ELSEWHERE_ANNOTATION,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VM_KIND,
    VM_PLURAL,
    agent_finalizer,
    finalizer_node,
)
from formation_vmm.controller.binding.binder import Binder
from formation_vmm.kube import ApiError, EventRecorder, Kube, NotFoundError, StatusWriter
from formation_vmm.migration_rules import restart_after_node_loss

log = logging.getLogger(__name__)

Body = dict[str, Any]


class LostNodes:
    def __init__(self, kube: Kube, binder: Binder, events: EventRecorder, default_strategy: str) -> None:
        self.kube = kube
        self.binder = binder
        self.events = events
        self.default_strategy = default_strategy
        # Finalizers are removed at the version read, read again on a conflict.
        self.vms = StatusWriter(kube, VM_PLURAL, VirtualMachineStatus)
        self.dependents: list[StatusWriter[Any]] = [
            StatusWriter(kube, SNAPSHOT_PLURAL, VmSnapshotStatus),
            StatusWriter(kube, RESTORE_PLURAL, VmRestoreStatus),
        ]
        self._given_up: set[str] = set()
        self._next_sweep = 0.0

    def pass_once(self) -> None:
        given_up = self.binder.given_up_nodes()
        for node in self._given_up - given_up.keys():  # back, or untainted: the notes go
            for body in self.kube.list(VM_PLURAL, label_selector=f"{NODE_LABEL}={node}"):
                self._say(body, None)
        self._given_up = set(given_up)
        for node, why in sorted(self._confirmed(given_up).items()):
            for body in self.kube.list(VM_PLURAL, label_selector=f"{NODE_LABEL}={node}"):
                try:
                    self._restart(node, why, body)
                except (ApiError, RuntimeError):  # RuntimeError: a finalizer kept changing
                    meta = body["metadata"]
                    log.exception("lost node %s: VM %s/%s", node, meta.get("namespace"), meta.get("name"))
        self._sweep_dependents()

    def _confirmed(self, given_up: dict[str, str]) -> dict[str, str]:
        """``given_up`` without the nodes whose Node the watch had not brought yet."""
        return {
            node: why
            for node, why in given_up.items()
            if not (why.startswith("its Node") and self._node_exists(node))
        }

    def _node_exists(self, node: str) -> bool:
        try:
            self.kube.node(node)
        except NotFoundError:
            return False
        return True

    def _restart(self, node: str, why: str, body: Body) -> None:
        vm = VirtualMachine.model_validate(body)
        if vm.metadata.deletion_timestamp is not None:
            self._let_go(node, why, body)
            return
        refusal = restart_after_node_loss(vm, self.default_strategy)
        if refusal is not None:
            self._say(body, f"node {node} is lost ({why}): {refusal.message}")
            return
        target = self.binder.restart_target(body, node)
        if target.node is None:
            self._say(body, f"node {node} is lost ({why}); no node can take the VM now: {target.message}")
            return
        moved = self.binder.move_binding(
            body, node, target.node, {EVICTION_ANNOTATION: None, RESTART_ELSEWHERE_ANNOTATION: None}
        )
        if moved is None:
            return  # it changed: the next pass reads it again
        message = (
            f"node {node} is lost ({why}): the VM starts on node {target.node} from its images; what "
            f"its guest wrote to its disks on {node} is lost with the node"
        )
        log.warning("%s/%s: %s", vm.metadata.namespace, vm.metadata.name, message)
        self.events.post(moved, VM_KIND, "RestartedElsewhere", message, "Warning")

    def _let_go(self, node: str, why: str, body: Body) -> None:
        """A VM deleted while its node is lost goes without its agent: the agent would remove its
        domain and files first, but it will not come back to do so. If the node does come back,
        its agent removes what the VM left there as an orphan's."""
        finalizer = agent_finalizer(node)
        if finalizer not in (body["metadata"].get("finalizers") or []):
            return
        # Its snapshots and restores first: once the VM is gone, their deletion (they are its
        # dependents) would wait for the same agent, and nothing would list them by it. A write
        # that fails raises, so the VM waits for the next pass.
        meta = body["metadata"]
        on_node = f"{NODE_LABEL}={node}"
        for writer in self.dependents:
            for item in self.kube.list(writer.plural, meta["namespace"], label_selector=on_node):
                if item["spec"].get("vmName") == meta["name"]:
                    writer.remove_finalizer(item, finalizer)
        self.vms.remove_finalizer(body, finalizer)
        message = (
            f"node {node} is lost ({why}): the VM is deleted without its agent; what it left on "
            f"{node} is removed if the node's agent comes back"
        )
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
        self.events.post(body, VM_KIND, "DeletedWithoutAgent", message, "Warning")

    def _sweep_dependents(self) -> None:
        """Snapshots and restores being deleted that wait for the agent of a node given up (its
        Node gone for ``node_lost_seconds`` counts even once no VM is bound there: they may all
        have restarted elsewhere) go without it when their VM is gone or bound elsewhere: their
        data was in the VM's files on that node, which its agent removes as an orphan's if it
        ever comes back. Those of a VM still bound there wait with it: if the node comes back,
        its agent deletes their data from the VM's disks, which stay. Two cluster-wide lists, at
        most once per ``node_lost_seconds``, not on every pass: a burst of VMs runs many passes."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.binder.node_lost_seconds
        try:
            deleting = [
                (writer, kind, item, finalizing_nodes(item))
                for writer, kind in zip(self.dependents, (SNAPSHOT_KIND, RESTORE_KIND), strict=True)
                for item in self.kube.list(writer.plural)
                if item["metadata"].get("deletionTimestamp")
            ]
            if not deleting:
                return
            waited_for = {node for *_, held in deleting for node in held}
            lost = self._confirmed(self.binder.given_up_nodes(also=waited_for))
        except ApiError:
            log.exception("lost nodes: listing snapshots and restores, or reading their nodes")
            return
        for writer, kind, item, held in deleting:
            for node in sorted(held & lost.keys()):
                self._let_go_of(writer, kind, item, node, lost[node])

    def _let_go_of(self, writer: StatusWriter[Any], kind: str, item: Body, node: str, why: str) -> None:
        meta = item["metadata"]
        try:
            vm = self.kube.get_or_none(VM_PLURAL, meta["namespace"], item["spec"]["vmName"])
            if vm is not None and (vm["metadata"].get("labels") or {}).get(NODE_LABEL) == node:
                return  # it waits with its VM
            writer.remove_finalizer(item, agent_finalizer(node))
        except (ApiError, RuntimeError):
            log.exception("lost node %s: %s %s/%s", node, kind, meta["namespace"], meta["name"])
            return
        message = f"node {node} is lost ({why}): deleted without its agent; its data is lost with the node"
        log.warning("%s %s/%s: %s", kind, meta["namespace"], meta["name"], message)
        self.events.post(item, kind, "DeletedWithoutAgent", message, "Warning")

    def _say(self, body: Body, message: str | None) -> None:
        annotations = body["metadata"].get("annotations") or {}
        if annotations.get(EVICTION_ANNOTATION) == message:
            return
        meta = body["metadata"]
        self.kube.patch(
            VM_PLURAL,
            meta["namespace"],
            meta["name"],
            {"metadata": {"annotations": {EVICTION_ANNOTATION: message}}},
        )
        if message is not None:
            self.events.post(body, VM_KIND, "WaitingForNode", message, "Warning")


def finalizing_nodes(item: Body) -> set[str]:
    """The nodes whose agent finalizer the object holds. A finalizer names its node, unless the
    node's name is too long for it (then a digest stands in): the object's label names the node
    that claimed it."""
    meta = item["metadata"]
    finalizers = set(meta.get("finalizers") or [])
    candidates = {node for f in finalizers if (node := finalizer_node(f))}
    label = (meta.get("labels") or {}).get(NODE_LABEL)
    if label:
        candidates.add(label)
    return {node for node in candidates if agent_finalizer(node) in finalizers}
