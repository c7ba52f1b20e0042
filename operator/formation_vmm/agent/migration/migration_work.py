"""What this node's migration work shares, as the target (migration_target.py) and as the
source (migration_source.py): the objects both act through, how a migration is read afresh,
whether it still asks for a running copy, and how it fails; and how the source reaches the
target (its published endpoint). The work runs in the agent's work queue (workqueue.py), one
key per VmMigration: never two jobs of one migration at a time."""

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.migration.relay import Relay
from formation_vmm.agent.vms.migration_marks import MigrationMarks
from formation_vmm.agent.vms.reconcile import Reconciler
from formation_vmm.agent.vms.sync import VmSync
from formation_vmm.agent.vms.vm_controller import VmCache
from formation_vmm.api.conditions import now
from formation_vmm.api.models import (
    VirtualMachineStatus,
    VmMigrationStatus,
)
from formation_vmm.api.names import (
    MIGRATION_ENDPOINT_ANNOTATION,
    MIGRATION_KIND,
    MIGRATION_PLURAL,
    NODE_LABEL,
    VM_PLURAL,
)
from formation_vmm.domain.naming import domain_name
from formation_vmm.informer import Informer, key_of
from formation_vmm.kube import EventRecorder, Kube, StatusWriter
from formation_vmm.migration_rules import Limits

log = logging.getLogger(__name__)

Body = dict[str, Any]
Poke = Callable[[str], None]

# How often a running copy is looked at, and how often its progress is written.
POLL_SECONDS = 0.5
PROGRESS_WRITE_SECONDS = 2.0
# A target still fetching a base, or waiting for libvirtd to clean up, looks again this soon.
RETRY_SECONDS = 2.0


class MigrationError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# host:port of a relay, as the agents advertise it (a name, an IPv4 or a bracketed IPv6 address).
_RELAY = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):[0-9]{1,5}$")
_LOCAL_URI = re.compile(r"^qemu\+unix:///system\?socket=(/[A-Za-z0-9._/-]{1,200})$")


def _safe_path(path: Path) -> bool:
    return path.is_absolute() and ".." not in path.parts


def local_socket(uri: str) -> Path | None:
    """The socket of ``qemu+unix:///system?socket=<absolute path>`` (and no other parameter:
    libvirt's ``command``, ``no_verify`` and the like never come from a peer); else None."""
    match = _LOCAL_URI.match(uri)
    if match is None or not _safe_path(Path(match[1])):
        return None
    return Path(match[1])


@dataclass(frozen=True)
class Endpoint:
    """How the source reaches the target: through the target agent's relay (its address and
    the certificate it shows), or, on one machine, straight to its libvirtd with the copy's
    sockets in a directory both libvirtds see."""

    relay: str = ""
    certificate: str = ""
    libvirt: str = ""
    sockets: Path | None = None

    @staticmethod
    def of(node: Body, allow_direct: bool = False) -> "Endpoint | None":
        """The endpoint a Node publishes (written by that node's agent, which may be a
        compromised one). The relay form always; the direct form only when this node runs
        migrations that way itself (one machine, ``migration_libvirt_uri``), and only as a
        libvirtd's local socket: the URI is handed to our own libvirtd, which would otherwise
        open whatever transport a peer names (ssh, tcp, a command of its choosing)."""
        text = ((node.get("metadata") or {}).get("annotations") or {}).get(MIGRATION_ENDPOINT_ANNOTATION)
        try:
            data = json.loads(text) if text else None
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        if data.get("relay") and data.get("certificate"):
            relay = str(data["relay"])
            return (
                Endpoint(relay=relay, certificate=str(data["certificate"])) if _RELAY.match(relay) else None
            )
        if not allow_direct or not data.get("libvirt") or not data.get("sockets"):
            return None
        sockets = Path(str(data["sockets"]))
        uri = str(data["libvirt"])
        if not _safe_path(sockets) or local_socket(uri) is None:
            return None
        return Endpoint(libvirt=uri, sockets=sockets)

    def annotation(self) -> str:
        if self.relay:
            return json.dumps({"relay": self.relay, "certificate": self.certificate}, sort_keys=True)
        return json.dumps({"libvirt": self.libvirt, "sockets": str(self.sockets)}, sort_keys=True)


@dataclass(frozen=True)
class Tuning:
    limits: Limits = field(default_factory=Limits)
    bandwidth_mib: int = 0
    auto_converge: bool = False
    # Migrations straight between libvirtds on one machine (no relay): only then is a peer's
    # direct endpoint believed (Endpoint.of).
    direct: bool = False


class MigrationWork:
    """What both halves of this node's migration work share: the objects they act through,
    the VmMigrations' informer (its store: each job reads the migration as it is now), and
    the end of a migration."""

    def __init__(
        self,
        node: str,
        kube: Kube,
        hypervisor: Hypervisor,
        reconciler: Reconciler,
        sync: VmSync,
        cache: VmCache,
        marks: MigrationMarks,
        migrations: StatusWriter[VmMigrationStatus],
        vms: StatusWriter[VirtualMachineStatus],
        events: EventRecorder,
        poke: Poke,
        watched: Informer,
        tuning: Tuning | None = None,
        clock: Callable[[], float] = time.monotonic,
        relay: Relay | None = None,
    ) -> None:
        self.node = node
        self.relay = relay
        self.kube = kube
        self.hypervisor = hypervisor
        self.reconciler = reconciler
        self.sync = sync
        self.cache = cache
        self.marks = marks
        self.migrations = migrations
        self.vms = vms
        self.events = events
        self.poke = poke
        self.watched = watched
        self.tuning = tuning or Tuning()
        self.clock = clock

    def _ended(self, body: Body) -> str | None:
        """Why a running copy must stop, from the store: its VmMigration is deleted (or another
        of that name replaced it), or the controller ended it (a node lost); None: it goes on."""
        now = self.watched.get(key_of(body))
        if now is None or now["metadata"].get("uid") != body["metadata"].get("uid"):
            return "the VmMigration was deleted"
        status = now.get("status") or {}
        if status.get("phase") in ("Succeeded", "Failed", "Cancelled") and not status.get("domainMoved"):
            return f"the VmMigration ended ({status.get('phase')})"
        return None

    def _fresh(self, body: Body, phase: str, role: str) -> Body | None:
        """The VmMigration as it is now, if it still asks this node for ``phase``'s work (an
        event may be older than our own last write)."""
        meta = body["metadata"]
        fresh = self.kube.get_or_none(MIGRATION_PLURAL, meta["namespace"], meta["name"])
        if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
            return None
        status = fresh.get("status") or {}
        if status.get("phase") != phase or status.get(role) != self.node or status.get("domainMoved"):
            return None
        return fresh

    def _bound_here(self, namespace: str, name: str) -> Body | None:
        """VM ``name``'s body if it is bound to this node. The watch's cache first; on a miss,
        the API: an agent that just started can get a migration's event before the VMs' list
        has filled the cache, and must not take its own VM for another node's (seen: a
        restarted source failed its migration with NotHere instead of SourceRestarted)."""
        body = self.cache.get(domain_name(namespace, name))
        if body is not None:
            return body
        body = self.kube.get_or_none(VM_PLURAL, namespace, name)
        if body is None or (body["metadata"].get("labels") or {}).get(NODE_LABEL) != self.node:
            return None
        return body

    def _fail(self, body: Body, reason: str, message: str) -> None:
        meta = body["metadata"]
        log.warning("migration %s/%s failed: %s", meta.get("namespace"), meta.get("name"), message)
        metrics.MIGRATIONS.labels("failed").inc()
        phase = "Cancelled" if reason == "Cancelled" else "Failed"
        written = self.migrations.write(
            body,
            lambda _: VmMigrationStatus(phase=phase, reason=reason, message=message, end_time=now()),
            guard=lambda b: (
                phase_of(b) not in ("Succeeded", "Failed", "Cancelled")
                and not (b.get("status") or {}).get("domainMoved")
            ),
        )
        if written is not None:
            self.events.post(body, MIGRATION_KIND, reason, message, "Warning")


def phase_of(body: Body) -> str | None:
    return (body.get("status") or {}).get("phase")


def target_of(body: Body) -> str:
    return str((body.get("status") or {}).get("targetNode") or "")
