"""Which streams this node's relay carries for a source node: those a VmMigration under way
from that node to this one asks for, and only until this node's own deadline for it
(migration_rules.target_deadline: from the migration's creation, by the VM's size). Asked when
a stream is opened and again every few seconds while it runs (agent/migration/relay.py), so a migration
that ended, failed or ran past the deadline keeps no connection to this node's libvirtd."""

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from formation_vmm.agent.migration.relay import Stream
from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import MIGRATION_PLURAL, VM_PLURAL
from formation_vmm.domain.naming import domain_name
from formation_vmm.kube import Kube
from formation_vmm.migration_rules import Limits, target_deadline

# Deadlines remembered per migration uid; past this many (a long-lived agent), forgotten and
# computed again from the VM.
REMEMBERED = 256


def stream_refusal(body: dict[str, Any] | None, node: str, source: str, stream: Stream) -> str | None:
    """Why the VmMigration ``body`` does not ask for ``stream`` from ``source`` now. Pure."""
    if body is None or body["metadata"].get("uid") != stream.uid:
        return "no such migration"
    status = body.get("status") or {}
    if status.get("targetNode") != node or status.get("sourceNode") != source:
        return f"the migration is not from node {source} to node {node}"
    if status.get("phase") not in ("Preparing", "Migrating"):
        return f"the migration is {status.get('phase') or 'not started'}"
    return None


def past_deadline(created: str | None, allowed: float, now: float) -> str | None:
    """Why a migration made at ``created`` (RFC 3339) is past ``allowed`` seconds, or None. Pure."""
    if not created:
        return None
    age = now - datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()
    if age > allowed:
        return f"the migration is past this node's deadline for it ({allowed:.0f}s after it was made)"
    return None


class RelayAccess:
    def __init__(self, kube: Kube, node: str, limits: Limits, clock: Callable[[], float] = time.time) -> None:
        self.kube = kube
        self.node = node
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        self._allowed: dict[str, float] = {}  # migration uid -> seconds after its creation
        self._vms: dict[str, str] = {}  # migration uid -> its VM's name

    def __call__(self, source: str, stream: Stream) -> str | None:
        body = self.kube.get_or_none(MIGRATION_PLURAL, stream.namespace, stream.migration)
        problem = stream_refusal(body, self.node, source, stream)
        if problem is not None or body is None:
            return problem
        vm_name = str((body.get("spec") or {}).get("vmName") or "")
        with self._lock:
            if len(self._vms) >= REMEMBERED:
                self._vms.clear()
            self._vms[stream.uid] = vm_name
        allowed = self._deadline(stream, vm_name)
        if allowed is None:
            return "its VM is gone"
        return past_deadline(body["metadata"].get("creationTimestamp"), allowed, self.clock())

    def domain_of(self, stream: Stream) -> str:
        """The libvirt domain a stream's migration moves (after it was authorised)."""
        with self._lock:
            vm_name = self._vms.get(stream.uid, "")
        return domain_name(stream.namespace, vm_name)

    def _deadline(self, stream: Stream, vm_name: str) -> float | None:
        with self._lock:
            if stream.uid in self._allowed:
                return self._allowed[stream.uid]
        vm = self.kube.get_or_none(VM_PLURAL, stream.namespace, vm_name) if vm_name else None
        if vm is None:
            return None
        spec = VirtualMachine.model_validate(vm).spec
        allowed = target_deadline(self.limits, spec.memory_bytes, spec.disk_bytes)
        with self._lock:
            if len(self._allowed) >= REMEMBERED:
                self._allowed.clear()
            self._allowed[stream.uid] = allowed
        return allowed
