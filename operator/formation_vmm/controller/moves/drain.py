"""Node maintenance: a node tainted ``vmm.formation.cloud/drain`` (by ``kubectl vm drain``, or
any tooling) has its VMs moved away per their evictionStrategy (docs/migration.md). Each pass
looks at the VMs bound to each draining node and creates a VmMigration (labeled with the node)
for each that should and can move; the migrations' limits hold as for any other. A VM that stays
says why in its annotation ``vmm.formation.cloud/eviction``, which ``kubectl vm drain`` prints;
the annotation goes when the node is uncordoned or the VM moves."""

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from formation_vmm.api.models import VirtualMachine, VmMigrationStatus
from formation_vmm.api.names import (
    API_VERSION,
    DRAIN_LABEL,
    DRAIN_TAINT,
    EVICTION_ANNOTATION,
    MIGRATION_KIND,
    MIGRATION_PLURAL,
    NODE_LABEL,
    RESTART_ELSEWHERE_ANNOTATION,
    VM_KIND,
    VM_PLURAL,
)
from formation_vmm.controller.binding.binder import Binder
from formation_vmm.controller.moves.migrations import snapshot_counts
from formation_vmm.kube import ApiError, EventRecorder, Kube
from formation_vmm.migration_rules import eviction

log = logging.getLogger(__name__)

Body = dict[str, Any]

# What the VM's agent reports once the restart's stop is done.
STOPPED_PHASES = ("Stopped", "Failed")
# A drain's migration that failed is tried again after this long (KubeVirt retries too).
RETRY_SECONDS = 30.0


def drain_migration_prefix(vm: str) -> str:
    """The drain's migrations are named by the apiserver from this prefix (generateName): a
    tenant cannot create one ahead of the drain under the name it would take, and block it."""
    return f"{vm[:200]}-drain-"


class Drainer:
    def __init__(self, kube: Kube, binder: Binder, events: EventRecorder, default_strategy: str) -> None:
        self.kube = kube
        self.binder = binder
        self.events = events
        self.default_strategy = default_strategy
        self._draining: set[str] = set()
        self._swept = False

    def pass_once(self) -> None:
        # A node given up for lost is the lost-node pass's (lost_nodes.py): its agent stops nothing.
        draining = self.binder.draining_nodes() - self.binder.given_up_nodes().keys()
        if not self._swept:
            self._sweep_notes()
            self._swept = True
        for node in self._draining - draining:  # uncordoned: what the drain said goes
            for body in self.kube.list(VM_PLURAL, label_selector=f"{NODE_LABEL}={node}"):
                self._say(body, None, keep_restart=False)  # one it was stopping starts again here
        self._draining = draining
        if not draining:
            return
        # Read once a pass, not once a VM: the snapshots, and each node's drain migrations.
        snapshots = snapshot_counts(self.kube)
        for node in sorted(draining):
            # The drain's own, by their VM: only the controller may set this label (the placement
            # policy), so a tenant's migration is never taken for one.
            drains = {
                (m["metadata"]["namespace"], str((m.get("spec") or {}).get("vmName", ""))): m
                for m in sorted(
                    self.kube.list(MIGRATION_PLURAL, label_selector=f"{DRAIN_LABEL}={node}"),
                    key=lambda m: m["metadata"].get("creationTimestamp") or "",
                )
            }
            for body in self.kube.list(VM_PLURAL, label_selector=f"{NODE_LABEL}={node}"):
                try:
                    self._evict(node, body, drains, snapshots)
                except ApiError:
                    meta = body["metadata"]
                    log.exception("draining %s: VM %s/%s", node, meta.get("namespace"), meta.get("name"))

    def _sweep_notes(self) -> None:
        """Once, at start: notes and restart marks a drain left on VMs of nodes uncordoned while
        no controller ran (the uncordon above only sees nodes this process saw draining). Each
        node is read from the API first, so a watch that has not delivered it yet misleads no one:
        a VM being stopped for a drain that goes on must not start again meanwhile."""
        nodes: dict[str, bool] = {}
        for body in self.kube.list(VM_PLURAL):
            annotations = body["metadata"].get("annotations") or {}
            if EVICTION_ANNOTATION not in annotations and RESTART_ELSEWHERE_ANNOTATION not in annotations:
                continue
            node = (body["metadata"].get("labels") or {}).get(NODE_LABEL, "")
            if node not in nodes:
                try:
                    taints = self.kube.node(node).get("spec", {}).get("taints") or []
                except ApiError:
                    continue  # gone, or no answer: the lost-node pass, or a later start, decides
                nodes[node] = any(t.get("key") == DRAIN_TAINT for t in taints)
            if nodes.get(node) is False and node not in self.binder.given_up_nodes():
                self._say(body, None, keep_restart=False)

    def _evict(
        self, node: str, body: Body, drains: dict[tuple[str, str], Body], snapshots: Counter[tuple[str, str]]
    ) -> None:
        vm = VirtualMachine.model_validate(body)
        if vm.metadata.deletion_timestamp is not None:
            return
        namespace = vm.metadata.namespace or ""
        existing = drains.get((namespace, vm.metadata.name))
        status = VmMigrationStatus.model_validate((existing or {}).get("status") or {})
        if existing is not None and status.phase in ("Failed", "Cancelled", "Succeeded"):
            ended = status.end_time or datetime.now(UTC)
            if status.phase == "Succeeded" or (datetime.now(UTC) - ended).total_seconds() > RETRY_SECONDS:
                self.kube.delete(
                    MIGRATION_PLURAL, namespace, existing["metadata"]["name"]
                )  # done, or tried again
            existing = None
        decision = eviction(
            vm,
            self.default_strategy,
            snapshots[namespace, vm.metadata.name],
            status.phase if existing is not None else None,
        )
        if existing is not None and status.phase == "Scheduling":
            # No node can take it now: the drain does not wait for one to appear.
            strategy = vm.spec.eviction_strategy or self.default_strategy
            verdict = "blocks the drain" if strategy == "LiveMigrate" else "it stays for now"
            self._say(body, f"{verdict}: no node can take it ({status.message})")
            return
        if decision.action == "stay":
            self._say(body, decision.message, keep_restart=False)
            return
        if decision.action == "restart":
            self._restart(node, body, vm, decision.message)
            return
        self._say(body, None, keep_restart=False)
        if decision.action == "migrate":
            self.kube.create(
                MIGRATION_PLURAL,
                namespace,
                {
                    "apiVersion": API_VERSION,
                    "kind": MIGRATION_KIND,
                    "metadata": {
                        "generateName": drain_migration_prefix(vm.metadata.name),
                        "namespace": namespace,
                        "labels": {DRAIN_LABEL: node},
                    },
                    "spec": {"vmName": vm.metadata.name},
                },
            )
            self.events.post(body, VM_KIND, "Evicting", f"node {node} is being drained: moving the VM live")

    def _restart(self, node: str, body: Body, vm: VirtualMachine, why: str) -> None:
        """Stop the VM here (its agent does, seeing the annotation), then bind it to another
        node in one write that also removes the annotation; that node's agent starts it from its
        images, and this node's removes the stopped domain and its files as an orphan's. Room
        is looked for before the VM is stopped, so that a drain does not stop what it cannot
        place; if it is gone once the VM stopped, the VM waits, stopped, for room."""
        target = self.binder.restart_target(body, node)
        stopping = vm.metadata.annotations.get(RESTART_ELSEWHERE_ANNOTATION) == node
        if target.node is None:
            if stopping:
                self._say(body, None)  # moving still: stopped, it waits for room
                return
            self._say(body, f"{why}, but no node can take it now ({target.message}): it stays for now")
            return
        if not stopping:
            self._say(body, None, restart_from=node)
            self.events.post(body, VM_KIND, "Evicting", f"node {node} is being drained: {why}")
            return
        if vm.status.phase not in STOPPED_PHASES:
            return  # its agent stops it
        moved = self.binder.move_binding(
            body, node, target.node, {RESTART_ELSEWHERE_ANNOTATION: None, EVICTION_ANNOTATION: None}
        )
        if moved is not None:
            message = (
                f"node {node} is being drained: the VM starts on node {target.node} from its images "
                f"(what its guest wrote to its disks on {node} is gone)"
            )
            self.events.post(moved, VM_KIND, "RestartedElsewhere", message, "Warning")

    def _say(
        self, body: Body, message: str | None, keep_restart: bool = True, restart_from: str = ""
    ) -> None:
        """The VM's eviction annotation, and the restart-elsewhere one (kept unless told):
        written only when they change."""
        annotations = body["metadata"].get("annotations") or {}
        wanted: dict[str, str | None] = {EVICTION_ANNOTATION: message}
        if restart_from:
            wanted[RESTART_ELSEWHERE_ANNOTATION] = restart_from
        elif not keep_restart:
            wanted[RESTART_ELSEWHERE_ANNOTATION] = None
        if all(annotations.get(key) == value for key, value in wanted.items()):
            return
        meta = body["metadata"]
        self.kube.patch(VM_PLURAL, meta["namespace"], meta["name"], {"metadata": {"annotations": wanted}})
        if message is not None and annotations.get(EVICTION_ANNOTATION) != message:
            self.events.post(
                body, VM_KIND, "EvictionBlocked" if "blocks" in message else "Staying", message, "Warning"
            )
