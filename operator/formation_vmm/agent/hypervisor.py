"""The one module that imports libvirt. It wraps libvirt errors into HypervisorError once, here."""

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import libvirt

from formation_vmm.agent.plan import Actual, DomainState, ShutoffReason
from formation_vmm.domain.spec import Owner
from formation_vmm.domain.xml import block_nodes, metadata_of, readonly_targets

log = logging.getLogger(__name__)

# libvirt prints every error to stderr by default, even those we expect and handle (looking up
# a domain that does not exist yet); errors reach us as exceptions instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


class HypervisorError(RuntimeError):
    """A libvirt call failed; the message is libvirt's own, fit for a condition."""


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    owner: Owner | None
    actual: Actual
    vcpus: int
    memory_kib: int


_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: DomainState.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: DomainState.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: DomainState.SHUTTING_DOWN,
    libvirt.VIR_DOMAIN_SHUTOFF: DomainState.SHUTOFF,
    libvirt.VIR_DOMAIN_CRASHED: DomainState.CRASHED,
}
_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: ShutoffReason.GUEST_SHUTDOWN,
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: ShutoffReason.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: ShutoffReason.CRASHED,
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: ShutoffReason.DESTROYED,
}


_event_loop_started = False
_event_loop_lock = threading.Lock()


def start_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread, once per process. It must run
    before a connection opens for that connection to deliver lifecycle events and keepalives."""
    global _event_loop_started  # noqa: PLW0603 - libvirt's event loop is process-wide by design
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


DomainListener = Callable[[str, str], None]  # (domain name, event) -> None


_EVENT_NAMES = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "suspended",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutdown",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}


class Hypervisor:
    """A libvirt connection. libvirt connections are thread-safe; kopf calls us from threads.

    With a listener, every domain lifecycle event on the connection is passed to it (from
    libvirt's event thread), and a connection that dies is reopened, events included.
    """

    def __init__(self, uri: str, listener: DomainListener | None = None) -> None:
        self.uri = uri
        self.listener = listener
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None

    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise HypervisorError(f"cannot connect to {self.uri}: {exc}") from exc
                if self.listener is not None:
                    self._subscribe(self._conn)
            return self._conn

    def _subscribe(self, conn: libvirt.virConnect) -> None:
        listener = self.listener
        assert listener is not None

        def on_lifecycle(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
            try:
                listener(dom.name(), _EVENT_NAMES.get(event, str(event)))
            except Exception:  # an exception must not escape into libvirt's C event loop
                log.exception("domain event listener failed")

        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
        with contextlib.suppress(libvirt.libvirtError):  # not every driver has keepalives (test:///)
            conn.setKeepAlive(5, 3)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def capacity(self) -> tuple[int, int]:
        """(logical CPUs, memory in bytes) of the host."""
        try:
            info = self._connection().getInfo()
        except libvirt.libvirtError as exc:
            raise HypervisorError(str(exc)) from exc
        return int(info[2]), int(info[1]) * 2**20

    def _lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._connection().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(str(exc)) from exc

    @staticmethod
    def _info(dom: libvirt.virDomain) -> DomainInfo:
        state, reason = dom.state()
        folded = _STATES.get(state, DomainState.OTHER)
        shutoff = ShutoffReason.NEVER_STARTED
        if folded is DomainState.SHUTOFF:
            shutoff = _SHUTOFF_REASONS.get(reason, ShutoffReason.NEVER_STARTED)
        _, max_mem, _, vcpus, _ = dom.info()
        meta = metadata_of(dom.XMLDesc(0))
        return DomainInfo(
            name=dom.name(),
            uuid=dom.UUIDString(),
            owner=meta.owner if meta else None,
            actual=Actual(folded, shutoff, meta.spec_hash if meta else None, bool(dom.isPersistent())),
            vcpus=int(vcpus),
            memory_kib=int(max_mem),
        )

    def describe(self, name: str) -> DomainInfo | None:
        try:
            dom = self._lookup(name)
            return None if dom is None else self._info(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # undefined between the lookup and the look
            raise HypervisorError(str(exc)) from exc

    def owned_domains(self) -> list[DomainInfo]:
        """Every domain whose metadata names a VM: the agent's, found without guessing from names."""
        try:
            domains = self._connection().listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(str(exc)) from exc
        infos = []
        for dom in domains:
            try:
                infos.append(self._info(dom))
            except libvirt.libvirtError as exc:
                # Undefined between the listing and the look: gone, which is no error.
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise HypervisorError(str(exc)) from exc
        return [info for info in infos if info.owner is not None]

    def define(self, xml: str) -> str:
        try:
            return str(self._connection().defineXML(xml).UUIDString())
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot define the domain: {exc}") from exc

    def _call(self, name: str, verb: str, *, missing_ok: bool = False) -> None:
        dom = self._lookup(name)
        if dom is None:
            if missing_ok:
                return
            raise HypervisorError(f"domain {name} does not exist")
        try:
            getattr(dom, verb)()
        except libvirt.libvirtError as exc:
            if missing_ok and exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            # Stopping a stopped domain is what we wanted anyway.
            if verb == "destroy" and exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                return
            raise HypervisorError(f"cannot {verb} {name}: {exc}") from exc

    def addresses(self, name: str) -> dict[str, str]:
        """MAC -> first IPv4 address of a running domain, from the libvirt network's DHCP leases,
        else from the guest agent when one answers. Empty when neither knows yet."""
        dom = self._lookup(name)
        if dom is None:
            return {}
        found: dict[str, str] = {}
        for source in (
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
            libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
        ):
            try:
                ifaces = dom.interfaceAddresses(source)
            except libvirt.libvirtError:
                continue  # no leases on this network, or no guest agent: not an error
            for iface in (ifaces or {}).values():
                mac = (iface.get("hwaddr") or "").lower()
                for addr in iface.get("addrs") or []:
                    if mac and mac not in found and addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                        found[mac] = str(addr["addr"])
            if found:
                break
        return found

    def start(self, name: str) -> None:
        self._call(name, "create")

    def suspend(self, name: str) -> None:
        self._call(name, "suspend")

    def resume(self, name: str) -> None:
        self._call(name, "resume")

    def shutdown(self, name: str) -> None:
        self._call(name, "shutdown")

    def destroy(self, name: str) -> None:
        self._call(name, "destroy", missing_ok=True)

    @property
    def live_block_ops(self) -> bool:
        """False on the test driver, whose domains hold no image open (files change offline)."""
        return not self.uri.startswith("test:")

    def block_resize(self, name: str, path: str, size: int) -> None:
        dom = self._lookup(name)
        if dom is None:
            raise HypervisorError(f"domain {name} is gone")
        try:
            dom.blockResize(path, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot grow {path} of {name}: {exc.get_error_message()}") from exc

    def undefine(self, name: str) -> None:
        """Undefine, with the metadata of any memory snapshots (their data goes with the disks)."""
        dom = self._lookup(name)
        if dom is None:
            return
        try:
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise HypervisorError(f"cannot undefine {name}: {exc}") from exc

    # --- snapshots: internal qcow2 snapshots, named by the caller -----------------------------

    def _qmp(self, dom: libvirt.virDomain, command: dict[str, Any]) -> Any:
        """A QMP command through libvirt, for what libvirt has no API for: internal disk-only
        snapshots of a running domain (QEMU's blockdev-snapshot-internal-sync)."""
        import libvirt_qemu  # with libvirt-python; only real QEMU domains get here

        try:
            return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"QEMU refused {command['execute']}: {exc.get_error_message()}") from exc

    def _block_nodes(self, dom: libvirt.virDomain, paths: list[str]) -> list[str]:
        nodes = block_nodes(dom.XMLDesc(0))
        missing = [p for p in paths if p not in nodes]
        if missing:
            raise HypervisorError(f"the running domain has no block node for {', '.join(missing)}")
        return [nodes[p] for p in paths]

    def snapshot_disks_live(self, name: str, paths: list[str], snapshot: str) -> None:
        """One internal snapshot on each disk of a running QEMU domain, in one transaction (all
        disks at the same instant), without pausing the guest for longer than the commit."""
        dom = self._require(name)
        actions = [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": snapshot}}
            for node in self._block_nodes(dom, paths)
        ]
        self._qmp(dom, {"execute": "transaction", "arguments": {"actions": actions}})

    def delete_disk_snapshots_live(self, name: str, paths: list[str], snapshot: str) -> None:
        dom = self._require(name)
        for node in self._block_nodes(dom, paths):
            self._qmp(
                dom,
                {
                    "execute": "blockdev-snapshot-delete-internal-sync",
                    "arguments": {"device": node, "name": snapshot},
                },
            )

    def snapshot_with_memory(self, name: str, snapshot: str) -> None:
        """A libvirt internal snapshot of a running domain: disks and memory, so a revert resumes
        the guest where it was. Read-only disks (the cloud-init seed) are left out."""
        dom = self._require(name)
        disks = "".join(f"<disk name='{t}' snapshot='no'/>" for t in readonly_targets(dom.XMLDesc(0)))
        xml = f"<domainsnapshot><name>{snapshot}</name><disks>{disks}</disks></domainsnapshot>"
        try:
            dom.snapshotCreateXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot snapshot {name}: {exc.get_error_message()}") from exc

    def has_snapshot(self, name: str, snapshot: str) -> bool:
        dom = self._lookup(name)
        if dom is None:
            return False
        try:
            return snapshot in dom.snapshotListNames(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(str(exc)) from exc

    def revert_snapshot(self, name: str, snapshot: str) -> None:
        dom = self._require(name)
        try:
            dom.revertToSnapshot(dom.snapshotLookupByName(snapshot, 0), 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot revert {name} to {snapshot}: {exc.get_error_message()}") from exc

    def delete_snapshot(self, name: str, snapshot: str) -> None:
        dom = self._lookup(name)
        if dom is None or not self.has_snapshot(name, snapshot):
            return
        try:
            dom.snapshotLookupByName(snapshot, 0).delete(0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(
                f"cannot delete snapshot {snapshot} of {name}: {exc.get_error_message()}"
            ) from exc

    def _require(self, name: str) -> libvirt.virDomain:
        dom = self._lookup(name)
        if dom is None:
            raise HypervisorError(f"domain {name} does not exist")
        return dom
