"""The one module that imports libvirt. It wraps libvirt errors into HypervisorError once, here."""

import logging
import threading
from dataclasses import dataclass

import libvirt

from formation_vmm.agent.plan import Actual, DomainState, ShutoffReason
from formation_vmm.domain.spec import Owner
from formation_vmm.domain.xml import owner_of

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
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: ShutoffReason.STOPPED_BY_US,
}


class Hypervisor:
    """A libvirt connection. libvirt connections are thread-safe; kopf calls us from threads."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._lock = threading.Lock()
        self._conn: libvirt.virConnect | None = None

    def _connection(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is None or not self._conn.isAlive():
                try:
                    self._conn = libvirt.open(self.uri)
                except libvirt.libvirtError as exc:
                    raise HypervisorError(f"cannot connect to {self.uri}: {exc}") from exc
            return self._conn

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

    def _require(self, name: str) -> libvirt.virDomain:
        dom = self._lookup(name)
        if dom is None:
            raise HypervisorError(f"domain {name} does not exist")
        return dom

    @staticmethod
    def _info(dom: libvirt.virDomain) -> DomainInfo:
        state, reason = dom.state()
        folded = _STATES.get(state, DomainState.OTHER)
        shutoff = ShutoffReason.NEVER_STARTED
        if folded is DomainState.SHUTOFF:
            shutoff = _SHUTOFF_REASONS.get(reason, ShutoffReason.NEVER_STARTED)
        _, max_mem, _, vcpus, _ = dom.info()
        return DomainInfo(
            name=dom.name(),
            uuid=dom.UUIDString(),
            owner=owner_of(dom.XMLDesc(0)),
            actual=Actual(folded, shutoff),
            vcpus=int(vcpus),
            memory_kib=int(max_mem),
        )

    def describe(self, name: str) -> DomainInfo | None:
        try:
            dom = self._lookup(name)
            return None if dom is None else self._info(dom)
        except libvirt.libvirtError as exc:
            raise HypervisorError(str(exc)) from exc

    def owned_domains(self) -> list[DomainInfo]:
        """Every domain whose metadata names a VM: the agent's, found without guessing from names."""
        try:
            domains = self._connection().listAllDomains(0)
            infos = [self._info(dom) for dom in domains]
        except libvirt.libvirtError as exc:
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

    def undefine(self, name: str) -> None:
        self._call(name, "undefine", missing_ok=True)
