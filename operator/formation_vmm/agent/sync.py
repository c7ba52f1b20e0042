"""Bring one VM and its domain in line, and report it: the one path every trigger takes.

Triggers are kopf's handlers (the VM changed), libvirt's lifecycle events (the domain changed)
and the periodic resync (anything drifted). A lock per VM keeps two triggers from acting on the
same domain at once; the status is written only when it changes.
"""

import contextlib
import logging
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import HypervisorError
from formation_vmm.agent.inputs import InputNotReadyError
from formation_vmm.agent.reconcile import Reconciler, restart_requested
from formation_vmm.agent.status import changes, status_after, status_failed, status_waiting
from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import VM_KIND
from formation_vmm.domain.build import UnsupportedSpecError
from formation_vmm.domain.naming import UnsafeNameError
from formation_vmm.kube import EventRecorder, StatusWriter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    """What happened, for the caller to decide on retries: ``retry`` is None when settled."""

    phase: str | None
    retry: str | None = None  # why the VM should be synced again soon
    permanent: str | None = None  # why the VM cannot run as specified
    outcome: str = "idle"  # for the metrics: idle, acted, waiting, failed, invalid


class VmSync:
    def __init__(
        self, reconciler: Reconciler, status: StatusWriter, events: EventRecorder, node: str
    ) -> None:
        self.reconciler = reconciler
        self.status = status
        self.events = events
        self.node = node
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._written: set[str] = set()  # VMs whose status this process has written
        self._guard = threading.Lock()

    def _lock(self, uid: str) -> threading.Lock:
        with self._guard:
            return self._locks[uid]

    @contextlib.contextmanager
    def locked(self, uid: str) -> Iterator[None]:
        """Hold the VM's lock: no sync acts on its domain meanwhile (snapshots, restores)."""
        with self._lock(uid):
            yield

    def forget(self, uid: str) -> None:
        with self._guard:
            self._locks.pop(uid, None)
            self._written.discard(uid)

    def sync(self, body: dict[str, Any]) -> SyncResult:
        """Reconcile ``body``, which comes from a watch or a cache and may lag behind our own
        last status write: first look, and if anything is to be done or written, re-read the VM
        and work from that, so a restart already carried out is never carried out twice. A VM
        we have not written since we started cannot lag behind us: no re-read for it."""
        vm = VirtualMachine.model_validate(body)
        uid = vm.metadata.uid or ""
        with self._lock(uid):
            if uid in self._written:
                fresh = self._fresh(body, vm)
                if fresh is None:
                    return SyncResult(vm.status.phase)
                body, vm = fresh, VirtualMachine.model_validate(fresh)
            return self._sync(body, vm)

    def _fresh(self, body: dict[str, Any], vm: VirtualMachine) -> dict[str, Any] | None:
        """None when nothing needs doing (or the VM is gone); else the VM as the API has it now."""
        try:
            preview = self.reconciler.reconcile(vm, dry_run=True)
            old = dict(body.get("status") or {})
            idle = not preview.actions and not changes(old, status_after(vm, old, preview, self.node))
        except Exception:  # an input or libvirt problem: the full pass reports it
            idle = False
        if idle:
            return None
        return self.status.get_or_none(vm.metadata.namespace or "", vm.metadata.name)

    def delete(self, body: dict[str, Any], grace_seconds: float | None = None) -> None:
        vm = VirtualMachine.model_validate(body)
        with self._lock(vm.metadata.uid or ""):
            self.reconciler.reconcile(vm, deleting=True, grace_seconds=grace_seconds)
        self.forget(vm.metadata.uid or "")

    def _sync(self, body: dict[str, Any], vm: VirtualMachine) -> SyncResult:
        with metrics.SYNC_SECONDS.time():
            result = self._sync_timed(body, vm)
        metrics.SYNCS.labels(result.outcome).inc()
        return result

    def _sync_timed(self, body: dict[str, Any], vm: VirtualMachine) -> SyncResult:
        old = dict(body.get("status") or {})
        try:
            outcome = self.reconciler.reconcile(vm)
        except InputNotReadyError as exc:
            reason, message = exc.reason, str(exc)
            self._report(body, vm, lambda st: status_waiting(vm, st, reason, message), reason, message)
            return SyncResult("Provisioning", retry=message, outcome="waiting")
        except (UnsupportedSpecError, UnsafeNameError) as exc:
            message = str(exc)
            self._report(
                body, vm, lambda st: status_failed(vm, st, "InvalidSpec", message), "InvalidSpec", message
            )
            return SyncResult("Failed", permanent=message, outcome="invalid")
        except (HypervisorError, OSError) as exc:
            reason = "HypervisorError" if isinstance(exc, HypervisorError) else "HostError"
            message = str(exc)
            self._report(body, vm, lambda st: status_failed(vm, st, reason, message), reason, message)
            return SyncResult("Failed", retry=message, outcome="failed")
        fields = status_after(vm, old, outcome, self.node)
        if changes(old, fields):
            self.status.write(body, lambda st: status_after(vm, st, outcome, self.node))
            self._written.add(vm.metadata.uid or "")
        if fields["phase"] != old.get("phase"):
            self.events.post(
                body,
                VM_KIND,
                fields["phase"],
                f"{old.get('phase') or 'new'} -> {fields['phase']} on {self.node}",
            )
        restarted = int(fields.get("restartCount") or 0) > int(old.get("restartCount") or 0)
        if restarted and not restart_requested(vm):
            self.events.post(
                body,
                VM_KIND,
                "Restarted",
                "the guest stopped and was started again per runStrategy",
                "Warning",
            )
        for action in outcome.actions:
            metrics.ACTIONS.labels(action.value).inc()
        return SyncResult(fields["phase"], outcome="acted" if outcome.actions else "idle")

    def _report(
        self, body: dict[str, Any], vm: VirtualMachine, update: Any, reason: str, message: str
    ) -> None:
        """Write a waiting or failed status, and say so once per distinct message."""
        old = dict(body.get("status") or {})
        if changes(old, update(old)):
            self.status.write(body, update)
            self._written.add(vm.metadata.uid or "")
        if old.get("message") != message:
            self.events.post(body, VM_KIND, reason, message, "Warning")
