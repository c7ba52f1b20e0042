"""The controller's part in live migrations (docs/migration.md): a VmMigration is checked (the
VM can move, or it fails at once with the reason), waits for a slot under the cluster's limits
(Pending), gets a target (Scheduling, then Preparing), and once the source's agent says the
guest runs on the target, the VM's binding moves there in one write (Succeeded). The agents do
the rest: the target prepares, the source copies (agent/migrations.py).

Decisions are taken one migration at a time under a lock, so two never take the same last slot.
The VM's status carries a copy of its migration's state (``status.migration``)."""

import logging
import threading
from collections import Counter
from typing import Any

from formation_vmm.api.conditions import now
from formation_vmm.api.models import (
    VirtualMachine,
    VirtualMachineStatus,
    VmMigration,
    VmMigrationStatus,
    VmMigrationSummary,
)
from formation_vmm.api.names import (
    DRAIN_LABEL,
    MIGRATION_KIND,
    NODE_LABEL,
    SNAPSHOT_PLURAL,
    VM_KIND,
    VM_PLURAL,
)
from formation_vmm.controller.binder import Binder
from formation_vmm.kube import EventRecorder, Kube, StatusWriter
from formation_vmm.migration_rules import (
    ACTIVE_PHASES,
    DONE_PHASES,
    SLOT_PHASES,
    Limits,
    Slot,
    cannot_move,
    slot_wait,
)

log = logging.getLogger(__name__)

Body = dict[str, Any]


class MigrationScheduler:
    def __init__(
        self,
        kube: Kube,
        binder: Binder,
        migrations: StatusWriter[VmMigrationStatus],
        vms: StatusWriter[VirtualMachineStatus],
        events: EventRecorder,
        limits: Limits | None = None,
    ) -> None:
        self.kube = kube
        self.binder = binder
        self.migrations = migrations
        self.vms = vms
        self.events = events
        self.limits = limits or Limits()
        self._known: dict[str, Body] = {}  # uid -> latest body, from the watch (migrations are few)
        self._lock = threading.Lock()  # one decision at a time
        self._guard = threading.Lock()  # _known

    # --- what the watch says -----------------------------------------------------------------

    def event(self, event_type: str | None, body: Body) -> Body | None:
        """Remember the migration; returns the body to act on (None: nothing to do)."""
        uid = body["metadata"].get("uid", "")
        with self._guard:
            if event_type == "DELETED":
                self._known.pop(uid, None)
            else:
                self._known[uid] = body
        # The target's room is held from the moment it is chosen until the migration ends (the
        # binding has moved by then, or the VM stays where it was).
        holding = event_type != "DELETED" and _phase(body) in SLOT_PHASES
        target = (body.get("status") or {}).get("targetNode") if holding else None
        namespace = body["metadata"].get("namespace", "")
        self.binder.reserve(uid, target, namespace, str((body.get("spec") or {}).get("vmName", "")))
        if event_type == "DELETED":
            status = body.get("status") or {}
            # Deleted after the guest moved, before the binding followed: the binding must follow.
            return body if status.get("domainMoved") and status.get("phase") == "Migrating" else None
        return body

    def pass_once(self) -> None:
        """Look again at every unfinished migration: slots free up, targets get room, a
        target that never got ready or a node lost mid-way ends the migration."""
        with self._guard:
            bodies = [b for b in self._known.values() if _phase(b) in (None, *ACTIVE_PHASES)]
        # A drain's migrations first (an admin's), then by age.
        order = sorted(bodies, key=lambda b: (not _drain(b), b["metadata"].get("creationTimestamp") or ""))
        for body in order:
            try:
                self.act(body)
            except Exception:
                log.exception(
                    "migration %s/%s", body["metadata"].get("namespace"), body["metadata"].get("name")
                )

    def _slots(self, but: str) -> tuple[list[Slot], int]:
        """The migrations that hold a slot now, and how many of a drain's wait for one, but
        migration ``but``."""
        with self._guard:
            others = [b for uid, b in self._known.items() if uid != but]
        busy = [
            Slot(
                str((b.get("status") or {}).get("sourceNode") or ""),
                b["metadata"].get("namespace", ""),
                _drain(b),
            )
            for b in others
            if _phase(b) in SLOT_PHASES
        ]
        return busy, sum(1 for b in others if _drain(b) and _phase(b) in (None, "Pending"))

    def _older_active(self, body: Body) -> str | None:
        """Another unfinished migration of the same VM, created before this one."""
        meta = body["metadata"]
        vm = (body.get("spec") or {}).get("vmName")
        mine = (meta.get("creationTimestamp") or "", meta.get("name"))
        with self._guard:
            for other in self._known.values():
                om = other["metadata"]
                if (
                    om.get("uid") != meta.get("uid")
                    and om.get("namespace") == meta.get("namespace")
                    and (other.get("spec") or {}).get("vmName") == vm
                    and _phase(other) in (None, *ACTIVE_PHASES)
                    and (om.get("creationTimestamp") or "", om.get("name")) < mine
                ):
                    return str(om.get("name"))
        return None

    # --- decisions ----------------------------------------------------------------------------

    def act(self, body: Body) -> None:
        with self._lock:
            phase = _phase(body)
            status = body.get("status") or {}
            if phase == "Migrating" and status.get("domainMoved"):
                self._finish(body)
            elif phase in (None, "Pending", "Scheduling"):
                self._schedule(body)
            elif phase in SLOT_PHASES:
                self._check_nodes(body)
            elif phase in DONE_PHASES:
                self._note_on_vm(body)

    def _schedule(self, body: Body) -> None:
        mig = VmMigration.model_validate(body)
        namespace = mig.metadata.namespace or ""
        vm_body = self.kube.get_or_none(VM_PLURAL, namespace, mig.spec.vm_name)
        if vm_body is None:
            self._fail(body, "VmNotFound", f"VM {mig.spec.vm_name} does not exist in namespace {namespace}")
            return
        vm = VirtualMachine.model_validate(vm_body)
        older = self._older_active(body)
        if vm.status.phase == "Migrating" and older is None:
            # Its last migration ended a moment ago: the target's agent has yet to say Running.
            self._wait(
                body, "Pending", "VmSettling", f"VM {vm.metadata.name} is settling after its last migration"
            )
            return
        if vm.status.phase == "Migrating":
            self._already(body, vm, older)
            return
        refusal = cannot_move(vm, self._snapshots_of(namespace, vm.metadata.name))
        if refusal is not None:
            self._fail(body, refusal.reason, refusal.message, vm_body)
            return
        source = vm.metadata.labels[NODE_LABEL]
        wanted = mig.spec.target_node
        if wanted and not self.binder.takes_migrations(wanted, source):
            self._fail(
                body, "BadTarget", self.binder.migration_target(vm_body, source, wanted).message, vm_body
            )
            return
        # After the request's own faults, so that each says its own reason whatever the order
        # in which requests made together are decided.
        if older is not None:
            self._already(body, vm, older)
            return
        busy, drains_waiting = self._slots(mig.metadata.uid or "")
        wait = slot_wait(Slot(source, namespace, _drain(body)), busy, self.limits, drains_waiting)
        if wait is not None:
            self._wait(body, "Pending", "LimitReached", wait)
            return
        decision = self.binder.migration_target(vm_body, source, wanted)
        if decision.node is None:
            self._wait(body, "Scheduling", "NoTarget", decision.message)
            return
        target = decision.node
        fields = VmMigrationStatus(
            phase="Preparing",
            reason=None,
            message=f"node {target} prepares the VM's disks and domain",
            source_node=source,
            target_node=target,
            start_time=now(),
        )
        written = self.migrations.write(
            body, lambda _: fields, guard=lambda b: _phase(b) in (None, "Pending", "Scheduling")
        )
        if written is not None and _phase(written) == "Preparing":
            self.event("MODIFIED", written)  # its slot counts for the next decision at once
            self._note_on_vm(written, vm_body)
            self.events.post(
                vm_body, VM_KIND, "Migrating", f"moving from {source} to {target} ({mig.metadata.name})"
            )

    def _already(self, body: Body, vm: VirtualMachine, older: str | None) -> None:
        self._fail(body, "AlreadyMigrating", f"VM {vm.metadata.name} is being moved by VmMigration {older}")

    def _check_nodes(self, body: Body) -> None:
        """A migration whose source or target node went silent ends, with the reason."""
        status = VmMigrationStatus.model_validate(body.get("status") or {})
        for role, node in (("source", status.source_node), ("target", status.target_node)):
            if node and not self.binder.node_ready(node):
                if status.phase == "Migrating" and role == "target":
                    continue  # the source's copy fails by itself, and says how
                self._fail(
                    body, f"{role.capitalize()}Lost", f"the agent on {role} node {node} stopped reporting"
                )
                return
        started = status.start_time
        if status.phase == "Preparing" and started is not None:
            waited = (now() - started).total_seconds()
            if waited > self.limits.progress_timeout:
                self._fail(
                    body,
                    "TargetNotReady",
                    f"node {status.target_node} did not get ready within {self.limits.progress_timeout:.0f}s",
                )

    def _finish(self, body: Body) -> None:
        """The guest runs on the target: the binding follows it, then the migration succeeds."""
        mig = VmMigration.model_validate(body)
        source, target = mig.status.source_node or "", mig.status.target_node or ""
        namespace = mig.metadata.namespace or ""
        vm_body: Body | None = None
        for _ in range(10):
            vm_body = self.kube.get_or_none(VM_PLURAL, namespace, mig.spec.vm_name)
            if vm_body is None:
                break
            label = (vm_body["metadata"].get("labels") or {}).get(NODE_LABEL)
            if label == target:
                break
            if label != source:
                log.warning(
                    "VM %s/%s is bound to %s, neither source nor target", namespace, mig.spec.vm_name, label
                )
                break
            moved = self.binder.move_binding(vm_body, source, target)
            if moved is not None:
                vm_body = moved
                break
        done = VmMigrationStatus(phase="Succeeded", end_time=now(), message=f"the VM runs on {target}")
        written = self.migrations.write(body, lambda _: done)  # None: deleted; the binding moved all the same
        if vm_body is not None:
            if written is not None:
                self._note_on_vm(written, vm_body)
            message = f"moved live from {source} to {target} ({mig.metadata.name})"
            self.events.post(vm_body, VM_KIND, "Migrated", message)

    # --- writes -------------------------------------------------------------------------------

    def _wait(self, body: Body, phase: str, reason: str, message: str) -> None:
        status = body.get("status") or {}
        if status.get("phase") == phase and status.get("message") == message:
            return  # said already: no write
        self.migrations.write(
            body,
            lambda _: VmMigrationStatus(phase=phase, reason=reason, message=message),
            guard=lambda b: _phase(b) in (None, "Pending", "Scheduling"),
        )

    def _fail(self, body: Body, reason: str, message: str, vm_body: Body | None = None) -> None:
        fields = VmMigrationStatus(phase="Failed", reason=reason, message=message, end_time=now())
        written = self.migrations.write(
            body,
            lambda _: fields,
            guard=lambda b: _phase(b) not in DONE_PHASES and not (b.get("status") or {}).get("domainMoved"),
        )
        if (
            written is None
            or _phase(written) != "Failed"
            or (written.get("status") or {}).get("reason") != reason
        ):
            return
        self.events.post(body, MIGRATION_KIND, reason, message, "Warning")
        if vm_body is not None:
            self._note_on_vm(written, vm_body)

    def _note_on_vm(self, body: Body, vm_body: Body | None = None) -> None:
        """The VM's ``status.migration``: this migration's state, unless it shows another's
        (a newer migration's note is never overwritten by an older one's end)."""
        mig = VmMigration.model_validate(body)
        if vm_body is None:
            vm_body = self.kube.get_or_none(VM_PLURAL, mig.metadata.namespace or "", mig.spec.vm_name)
            if vm_body is None:
                return
        summary = VmMigrationSummary(
            name=mig.metadata.name,
            phase=mig.status.phase,
            source_node=mig.status.source_node,
            target_node=mig.status.target_node,
            start_time=mig.status.start_time,
            end_time=mig.status.end_time,
            message=mig.status.message if mig.status.phase == "Failed" else None,
        )
        shown = VirtualMachineStatus.model_validate(vm_body.get("status") or {}).migration
        if shown is not None and shown.model_dump() == summary.model_dump():
            return
        if (
            shown is not None
            and shown.name != summary.name
            and shown.phase in ACTIVE_PHASES
            and summary.phase in DONE_PHASES
        ):
            return
        self.vms.write(vm_body, lambda _: VirtualMachineStatus(migration=summary))

    def _snapshots_of(self, namespace: str, vm: str) -> int:
        return snapshot_counts(self.kube, namespace)[namespace, vm]


def snapshot_counts(kube: Kube, namespace: str | None = None) -> Counter[tuple[str, str]]:
    """(namespace, VM) -> how many VmSnapshots of it exist and are not being deleted: they live
    inside its disks, and a live migration would leave them behind (migration_rules)."""
    return Counter(
        (snap["metadata"].get("namespace", ""), str((snap.get("spec") or {}).get("vmName", "")))
        for snap in kube.list(SNAPSHOT_PLURAL, namespace)
        if not snap["metadata"].get("deletionTimestamp")
    )


def _drain(body: Body) -> bool:
    """A drain's migration: labeled so by the controller (only it may set the label)."""
    return bool((body["metadata"].get("labels") or {}).get(DRAIN_LABEL))


def _phase(body: Body) -> str | None:
    return (body.get("status") or {}).get("phase")
