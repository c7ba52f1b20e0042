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
    EVICTION_ANNOTATION,
    MIGRATION_KIND,
    MIGRATION_PLURAL,
    NODE_LABEL,
    VM_KIND,
    VM_PLURAL,
)
from formation_vmm.controller.binder import Binder
from formation_vmm.controller.migrations import snapshot_counts
from formation_vmm.kube import ApiError, EventRecorder, Kube
from formation_vmm.migration_rules import eviction

log = logging.getLogger(__name__)

Body = dict[str, Any]

# A drain's migration that failed is tried again after this long (KubeVirt retries too).
RETRY_SECONDS = 30.0


def drain_migration_name(vm: str) -> str:
    return f"{vm[:240]}-drain"


class Drainer:
    def __init__(self, kube: Kube, binder: Binder, events: EventRecorder, default_strategy: str) -> None:
        self.kube = kube
        self.binder = binder
        self.events = events
        self.default_strategy = default_strategy
        self._draining: set[str] = set()

    def pass_once(self) -> None:
        draining = self.binder.draining_nodes()
        for node in self._draining - draining:  # uncordoned: what the drain said goes
            for body in self.kube.list(VM_PLURAL, label_selector=f"{NODE_LABEL}={node}"):
                self._say(body, None)
        self._draining = draining
        if not draining:
            return
        # Read once a pass, not once a VM: the snapshots, and each node's drain migrations.
        snapshots = snapshot_counts(self.kube)
        for node in sorted(draining):
            drains = {
                (m["metadata"]["namespace"], m["metadata"]["name"]): m
                for m in self.kube.list(MIGRATION_PLURAL, label_selector=f"{DRAIN_LABEL}={node}")
            }
            for body in self.kube.list(VM_PLURAL, label_selector=f"{NODE_LABEL}={node}"):
                try:
                    self._evict(node, body, drains, snapshots)
                except ApiError:
                    meta = body["metadata"]
                    log.exception("draining %s: VM %s/%s", node, meta.get("namespace"), meta.get("name"))

    def _evict(
        self, node: str, body: Body, drains: dict[tuple[str, str], Body], snapshots: Counter[tuple[str, str]]
    ) -> None:
        vm = VirtualMachine.model_validate(body)
        if vm.metadata.deletion_timestamp is not None:
            return
        namespace = vm.metadata.namespace or ""
        name = drain_migration_name(vm.metadata.name)
        existing = drains.get((namespace, name))
        status = VmMigrationStatus.model_validate((existing or {}).get("status") or {})
        if existing is not None and status.phase in ("Failed", "Cancelled", "Succeeded"):
            ended = status.end_time or datetime.now(UTC)
            if status.phase == "Succeeded" or (datetime.now(UTC) - ended).total_seconds() > RETRY_SECONDS:
                self.kube.delete(MIGRATION_PLURAL, namespace, name)  # done with, or tried again
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
            self._say(body, decision.message)
            return
        self._say(body, None)
        if decision.action == "migrate":
            self.kube.create(
                MIGRATION_PLURAL,
                namespace,
                {
                    "apiVersion": API_VERSION,
                    "kind": MIGRATION_KIND,
                    "metadata": {"name": name, "namespace": namespace, "labels": {DRAIN_LABEL: node}},
                    "spec": {"vmName": vm.metadata.name},
                },
            )
            self.events.post(body, VM_KIND, "Evicting", f"node {node} is being drained: moving the VM live")

    def _say(self, body: Body, message: str | None) -> None:
        """The VM's eviction annotation: written only when it changes."""
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
            self.events.post(
                body, VM_KIND, "EvictionBlocked" if "blocks" in message else "Staying", message, "Warning"
            )
