"""The controller's part in live migrations (docs/migration.md): a VmMigration is checked (the
VM can move, or it fails at once with the reason), waits for a slot under the cluster's limits
(Pending), gets a target (Scheduling, then Preparing), and once the source's agent says the
guest runs on the target, the VM's binding moves there in one write (Succeeded). The agents do
the rest: the target prepares, the source copies (agent/migration/migrations.py).

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
from formation_vmm.controller.binding.binder import Binder
from formation_vmm.kube import EventRecorder, Kube, StatusWriter
from formation_vmm.migration_rules import (
    ACTIVE_PHASES,
    DONE_PHASES,
    SLOT_PHASES,
    Limits,
    Slot,
    Verdict,
    cannot_move,
    schedule,
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
        """Gathers what ``schedule`` (migration_rules.py) asks for, and carries out its verdict."""
        mig = VmMigration.model_validate(body)
        namespace = mig.metadata.namespace or ""
        vm_body = self.kube.get_or_none(VM_PLURAL, namespace, mig.spec.vm_name)
        vm = VirtualMachine.model_validate(vm_body) if vm_body is not None else None
        source = vm.metadata.labels.get(NODE_LABEL, "") if vm is not None else ""
        wanted = mig.spec.target_node

        def wanted_refusal() -> str | None:
            assert vm_body is not None and wanted
            if self.binder.takes_migrations(wanted, source):
                return None
            return self.binder.migration_target(vm_body, source, wanted).message

        def wait() -> str | None:
            busy, drains_waiting = self._slots(mig.metadata.uid or "")
            return slot_wait(Slot(source, namespace, _drain(body)), busy, self.limits, drains_waiting)

        def target() -> tuple[str | None, str]:
            assert vm_body is not None
            decision = self.binder.migration_target(vm_body, source, wanted)
            return decision.node, decision.message

        verdict = schedule(
            vm,
            mig.spec.vm_name,
            namespace,
            self._older_active(body),
            lambda: cannot_move(vm, self._snapshots_of(namespace, mig.spec.vm_name)) if vm else None,
            wanted,
            wanted_refusal,
            wait,
            target,
        )
        if verdict.phase == "Failed":
            self._fail(body, verdict.reason or "", verdict.message, vm_body if verdict.note_on_vm else None)
        elif verdict.phase != "Preparing":
            self._wait(body, verdict.phase, verdict.reason or "", verdict.message)
        else:
            assert vm_body is not None and verdict.target is not None
            self._start(body, vm_body, source, verdict)

    def _start(self, body: Body, vm_body: Body, source: str, verdict: Verdict) -> None:
        fields = VmMigrationStatus(
            phase="Preparing",
            reason=None,
            message=verdict.message,
            source_node=source,
            target_node=verdict.target,
            start_time=now(),
        )
        written = self.migrations.write(
            body, lambda _: fields, guard=lambda b: _phase(b) in (None, "Pending", "Scheduling")
        )
        if written is not None and _phase(written) == "Preparing":
            self.event("MODIFIED", written)  # its slot counts for the next decision at once
            self._note_on_vm(written, vm_body)
            name = body["metadata"]["name"]
            self.events.post(
                vm_body, VM_KIND, "Migrating", f"moving from {source} to {verdict.target} ({name})"
            )

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
