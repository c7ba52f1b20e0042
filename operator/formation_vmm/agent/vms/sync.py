"""Bring one VM and its domain in line, and report it: the one path every trigger takes.

A lock per domain name keeps two paths (a sync, a snapshot, a deletion) from acting on the same
domain at once; the status is written only when it changes.
"""

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import HypervisorError, HypervisorUnavailableError
from formation_vmm.agent.plan import Action
from formation_vmm.agent.probes import liveness
from formation_vmm.agent.probes.liveness import LivenessView, Move
from formation_vmm.agent.probes.probe_state import Readiness
from formation_vmm.agent.probes.prober import Prober, probe_target
from formation_vmm.agent.state import Outcome, restart_requested
from formation_vmm.agent.vms.inputs import InputNotReadyError
from formation_vmm.agent.vms.reconcile import Decided, Reconciler
from formation_vmm.agent.vms.status import (
    bound_fields,
    changes,
    status_after,
    status_failed,
    status_unknown,
    status_waiting,
)
from formation_vmm.api.conditions import now
from formation_vmm.api.models import VirtualMachine, VirtualMachineStatus
from formation_vmm.api.names import NODE_LABEL, VM_KIND
from formation_vmm.domain.build import UnsupportedSpecError
from formation_vmm.domain.naming import UnsafeNameError, domain_name
from formation_vmm.kube import EventRecorder, StatusWriter

log = logging.getLogger(__name__)

Body = dict[str, Any]


@dataclass(frozen=True)
class SyncResult:
    """What happened, for the caller to decide when to look again."""

    retry_after: float | None = None  # sync this VM again after this many seconds
    outcome: str = "idle"  # for the metrics: idle, acted, waiting, failed, invalid, unavailable
    finished: bool = False  # a deletion: the domain and files are gone
    gone: bool = False  # the VM no longer exists in the API (its deletion was missed)


# (the resourceVersion of the cache's copy the sync started from, or None; the VM as written)
Written = Callable[[str | None, Body], None]


class VmSync:
    def __init__(
        self,
        reconciler: Reconciler,
        status: StatusWriter[VirtualMachineStatus],
        events: EventRecorder,
        node: str,
        retry_seconds: float = 10.0,
        prober: Prober | None = None,
        on_written: Written | None = None,
        snapshots: Callable[[str, str], int] | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.snapshots = snapshots or (lambda _namespace, _vm: 0)  # VmSnapshots of a VM
        self.on_written = on_written  # told of each VM our status write made, as it returns
        self.prober = prober
        self.status = status
        self.events = events
        self.node = node
        self.retry_seconds = retry_seconds
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._written: set[str] = set()  # VM uids whose status this process has written
        # uid -> the resourceVersion the sync under way started from (the cache's copy)
        self._origin: dict[str, str | None] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def locked(self, domain: str) -> Iterator[None]:
        """Hold the lock of the domain named ``domain``: no sync acts on it meanwhile."""
        with self._guard:
            lock = self._locks[domain]
        with lock:
            yield

    def forget(self, domain: str, uid: str) -> None:
        with self._guard:
            self._locks.pop(domain, None)
            self._written.discard(uid)

    def sync(self, body: Body) -> SyncResult:
        """Reconcile ``body``, which comes from the cache and may lag behind the API (a binding
        moved by a migration or a restart elsewhere that the watch has not brought yet): plan
        from it, and if anything is to be done or written, read the VM from the API before
        acting. The plan is carried out as made when the API has the very version planned from
        (nearly always: the cache holds our own writes as they return); else it is made again
        from the API's. A VM we have not written since we started cannot lag behind us: no read
        for it."""
        vm = VirtualMachine.model_validate(body)
        uid = vm.metadata.uid or ""
        with self.locked(_domain(vm)):
            self._origin[uid] = body["metadata"].get("resourceVersion")
            decided: Decided | None = None
            if uid in self._written:
                decided, idle = self._look(body, vm)
                if idle:
                    return SyncResult()
                fresh = self.status.get_or_none(vm.metadata.namespace, vm.metadata.name) or {}
                meta = fresh.get("metadata", {})
                if meta.get("uid") != uid or (meta.get("labels") or {}).get(NODE_LABEL) != self.node:
                    # Gone, or bound to another node since the cache's copy (a migration or a
                    # restart elsewhere whose binding the watch has not brought yet): not ours
                    # to act on. Seen: a migrated VM's source, poked as the migration ended,
                    # made the VM's files again from its stale copy.
                    return SyncResult(gone=True)
                if meta.get("resourceVersion") != body["metadata"].get("resourceVersion"):
                    decided = None  # the VM changed since the cache's copy: planned anew
                body, vm = fresh, VirtualMachine.model_validate(fresh)
            try:
                with metrics.SYNC_SECONDS.time():
                    result = self._sync(body, vm, decided)
            finally:
                self._origin.pop(uid, None)
        metrics.SYNCS.labels(result.outcome).inc()
        return result

    def _look(self, body: Body, vm: VirtualMachine) -> tuple[Decided | None, bool]:
        """The plan from the cache's copy, and whether the sync is idle (nothing to do, nothing
        to write). No plan when making one failed (an input or libvirt problem: the sync
        proper meets it again and reports it)."""
        try:
            decided = self.reconciler.decide(vm)
            preview = self.reconciler.preview(vm, decided)
            key = _domain(vm)
            readiness = self.prober.readiness(key) if self.prober is not None else None
            failed = self.prober is not None and self.prober.liveness_failure(key) is not None
            count = self.snapshots(vm.metadata.namespace or "", vm.metadata.name)
            would_write = self._bound(
                vm, lambda st: status_after(vm, st, preview, self.node, readiness=readiness, snapshots=count)
            )
            idle = (
                not preview.actions
                and not failed
                and not changes(dict(body.get("status") or {}), would_write(vm.status))
            )
        except Exception:
            return None, False
        return decided, idle

    def delete(self, body: Body, grace_seconds: float | None = None) -> SyncResult:
        """One step of a deleted VM's way out: a graceful stop first (the result says when to
        look again), then the domain and its files; ``finished`` once they are gone."""
        vm = VirtualMachine.model_validate(body)
        domain = _domain(vm)
        with self.locked(domain):
            try:
                outcome = self.reconciler.reconcile(vm, deleting=True, grace_seconds=grace_seconds)
            except HypervisorError as exc:
                log.warning("%s: cannot remove the domain yet: %s", domain, exc)
                return SyncResult(retry_after=self.retry_seconds, outcome="unavailable")
            owner = outcome.domain.owner if outcome.domain else None
            mine = owner is not None and owner.uid == vm.metadata.uid
            if mine and "resourceVersion" in body["metadata"]:
                self._write(body, vm, lambda st: status_after(vm, st, outcome, self.node, deleting=True))
        if mine:
            return SyncResult(retry_after=outcome.requeue_after, outcome="acted")
        self.forget(domain, vm.metadata.uid or "")
        return SyncResult(outcome="acted", finished=True)

    def _sync(self, body: Body, vm: VirtualMachine, decided: Decided | None = None) -> SyncResult:
        try:
            outcome = self.reconciler.reconcile(vm, decided=decided)
        except InputNotReadyError as exc:
            reason, message, condition = exc.reason, str(exc), exc.condition
            self._report(
                body, vm, lambda st: status_waiting(vm, st, reason, message, condition), reason, message
            )
            return SyncResult(retry_after=self.retry_seconds, outcome="waiting")
        except (UnsupportedSpecError, UnsafeNameError) as exc:
            message = str(exc)
            self._report(
                body, vm, lambda st: status_failed(vm, st, "InvalidSpec", message), "InvalidSpec", message
            )
            return SyncResult(outcome="invalid")
        except HypervisorUnavailableError as exc:
            message = f"libvirt is unavailable on {self.node}: {exc}"
            self._report(
                body,
                vm,
                lambda st: status_unknown(vm, st, "HypervisorUnavailable", message),
                "HypervisorUnavailable",
                message,
            )
            return SyncResult(retry_after=self.retry_seconds, outcome="unavailable")
        except (HypervisorError, OSError) as exc:
            reason = "HypervisorError" if isinstance(exc, HypervisorError) else "HostError"
            message = str(exc)
            self._report(body, vm, lambda st: status_failed(vm, st, reason, message), reason, message)
            return SyncResult(retry_after=self.retry_seconds, outcome="failed")
        except Exception as exc:  # a bug, or input nobody foresaw: said, never a crash loop
            log.exception("%s: sync failed", _domain(vm))
            message = f"the agent could not handle this VM: {type(exc).__name__}: {exc}"[:500]
            self._report(
                body, vm, lambda st: status_failed(vm, st, "InternalError", message), "InternalError", message
            )
            return SyncResult(retry_after=self.retry_seconds, outcome="failed")
        outcome, readiness = self._probe(body, vm, outcome)
        count = self.snapshots(vm.metadata.namespace or "", vm.metadata.name)
        old = dict(body.get("status") or {})
        fields = self._write_if_changed(
            body,
            vm,
            lambda st: status_after(vm, st, outcome, self.node, readiness=readiness, snapshots=count),
        )
        if fields.phase != old.get("phase"):
            _observe_way_up(vm, old.get("phase"), str(fields.phase))
            if old.get("phase") not in _WAY_UP:
                # Leaving Running (or Stopped, Paused...) is news in `kubectl describe`; the way up
                # only repeats the status, and costs the apiserver a write per VM (decisions.md).
                self.events.post(
                    body, VM_KIND, str(fields.phase), f"{old.get('phase')} -> {fields.phase} on {self.node}"
                )
        if Action.AGENT_SHUTDOWN in outcome.actions:
            self.events.post(
                body,
                VM_KIND,
                "GuestAgentShutdown",
                "the guest did not power off on ACPI in half its grace period; asked its guest agent",
            )
        if fields.restart_count > vm.status.restart_count and not restart_requested(vm):
            self.events.post(
                body,
                VM_KIND,
                "Restarted",
                "the guest stopped and was started again per runStrategy",
                "Warning",
            )
        return SyncResult(retry_after=outcome.requeue_after, outcome="acted" if outcome.actions else "idle")

    def _probe(self, body: Body, vm: VirtualMachine, outcome: Outcome) -> tuple[Outcome, Readiness | None]:
        """Keep the VM's probes in step with its domain; a liveness probe that failed restarts the
        guest here (a hard stop, then the plan starts it again per runStrategy)."""
        if self.prober is None:
            return outcome, None
        key = _domain(vm)
        # The source wrote Migrating; the guest goes on here, and so does its readiness.
        arrived = vm.status.phase == "Migrating" and any(
            c.type == "Ready" and c.status == "True" for c in vm.status.conditions
        )
        self.prober.update(key, probe_target(vm, outcome.domain, outcome.stopping), ready_already=arrived)
        failure = self.prober.liveness_failure(key)
        view = LivenessView(failure, outcome.stopping, vm.status.phase == "Migrating")
        if liveness.decide(view) is Move.KILL:
            self.prober.update(key, None)  # the next run is probed afresh
            self.events.post(
                body, VM_KIND, "LivenessProbeFailed", f"{failure}; restarting the guest", "Warning"
            )
            self.reconciler.hard_stop(vm)
            again = self.reconciler.reconcile(vm)
            outcome = replace(again, actions=[*outcome.actions, *again.actions])
            self.prober.update(key, probe_target(vm, outcome.domain, outcome.stopping))
        return outcome, self.prober.readiness(key)

    def _write(
        self, body: Body, vm: VirtualMachine, update: Callable[[VirtualMachineStatus], VirtualMachineStatus]
    ) -> None:
        uid = vm.metadata.uid or ""
        written = self.status.write(body, self._bound(vm, update))
        self._written.add(uid)
        if written is not None and self.on_written is not None:
            # Once, as the write returns: before the watch's echo of it, which the cache then
            # knows for ours; and the cache's copy, if still the one the sync started from,
            # becomes the written one.
            self.on_written(self._origin.get(uid), written)
        if written is not None and uid in self._origin:  # a second write follows from this one
            self._origin[uid] = written["metadata"].get("resourceVersion")

    def _write_if_changed(
        self, body: Body, vm: VirtualMachine, update: Callable[[VirtualMachineStatus], VirtualMachineStatus]
    ) -> VirtualMachineStatus:
        """The fields ``update`` gives (with the binding) from the status as read, written only
        when they change it."""
        fields = self._bound(vm, update)(vm.status)
        if changes(dict(body.get("status") or {}), fields):
            self._write(body, vm, update)
        return fields

    def _bound(
        self, vm: VirtualMachine, update: Callable[[VirtualMachineStatus], VirtualMachineStatus]
    ) -> Callable[[VirtualMachineStatus], VirtualMachineStatus]:
        """``update`` with what the binding means (the controller's one write is the label, the
        finalizer and the addresses; the status says it in the agent's first write)."""

        def with_binding(st: VirtualMachineStatus) -> VirtualMachineStatus:
            return bound_fields(update(st), st, vm, self.node)

        return with_binding

    def _report(
        self,
        body: Body,
        vm: VirtualMachine,
        update: Callable[[VirtualMachineStatus], VirtualMachineStatus],
        reason: str,
        message: str,
    ) -> None:
        """Write a waiting, failed or unknown status, and say so once per distinct message."""
        old = dict(body.get("status") or {})
        self._write_if_changed(body, vm, update)
        if old.get("message") != message:
            self.events.post(body, VM_KIND, reason, message, "Warning")


# The phases of a VM on its way up: a transition out of one of them counts from creation.
_WAY_UP = {None, "Pending", "Scheduled", "Provisioning", "Starting"}


def _observe_way_up(vm: VirtualMachine, old_phase: str | None, new_phase: str) -> None:
    created = vm.metadata.creation_timestamp
    if created is None or old_phase not in _WAY_UP or vm.status.started_at is not None:
        return  # a VM that ran before: not a way up from creation
    metrics.PHASE_FROM_CREATION.labels(new_phase).observe(max((now() - created).total_seconds(), 0.0))


def _domain(vm: VirtualMachine) -> str:
    return domain_name(vm.metadata.namespace or "", vm.metadata.name)
