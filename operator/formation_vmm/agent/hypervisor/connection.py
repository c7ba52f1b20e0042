"""libvirt, for the agent: domains defined, started, stopped and described; lifecycle events
passed on; dead connections reopened."""

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import libvirt

from formation_vmm.agent.plan import Actual, DomainState, ShutoffReason
from formation_vmm.agent.state import DomainInfo
from formation_vmm.domain.xml import observe

log = logging.getLogger(__name__)

# libvirt prints every error to stderr by default, even those we expect and handle (looking up
# a domain that does not exist yet); errors reach us as exceptions instead.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

# A daemon that stops answering is noticed after about KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT + 1)
# seconds; the call waiting on it then fails instead of hanging its thread.
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3
# How long a caller waits for a connection to open before it is told libvirtd does not answer.
OPEN_TIMEOUT = 10.0
# What /metrics asks libvirt for, for every domain at once.
STATS = (
    libvirt.VIR_DOMAIN_STATS_STATE
    | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
    | libvirt.VIR_DOMAIN_STATS_BALLOON
    | libvirt.VIR_DOMAIN_STATS_VCPU
    | libvirt.VIR_DOMAIN_STATS_INTERFACE
    | libvirt.VIR_DOMAIN_STATS_BLOCK
)


class HypervisorError(RuntimeError):
    """A libvirt call failed; the message is libvirt's own, fit for a condition."""


class HypervisorUnavailableError(HypervisorError):
    """libvirtd cannot be reached (stopped, restarting, hung): nothing is known of the domains."""


# Error domains of the connection itself, not of an operation on a domain.
_CONNECTION_DOMAINS = {libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE}
_CONNECTION_CODES = {libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_NO_CONNECT}


def hypervisor_error(exc: libvirt.libvirtError, context: str = "") -> HypervisorError:
    prefix = f"{context}: " if context else ""
    text = f"{prefix}{exc.get_error_message() or exc}"
    if exc.get_error_domain() in _CONNECTION_DOMAINS or exc.get_error_code() in _CONNECTION_CODES:
        return HypervisorUnavailableError(text)
    return HypervisorError(text)


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
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # the loop serves every connection: it must outlive any error
                    log.exception("libvirt's event loop failed an iteration")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def probe(uri: str) -> str | None:
    """None when libvirt answers at ``uri``, else why not (for `vmm dev up`'s choice)."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        return str(exc)
    conn.close()
    return None


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


class _Slot:
    """A connection and the lock that lets one call at a time use it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.conn: libvirt.virConnect | None = None


class Hypervisor:
    """libvirt for many threads. Each thread calls on a connection of its own: libvirt's client
    (9.0) wakes only one of the calls waiting on a connection when keepalive declares the daemon
    dead, and leaves the others hanging until the daemon answers again. One call in flight per
    connection means every call waiting on a hung daemon fails after the keepalive timeout.

    With a listener, every domain lifecycle event is passed to it (from libvirt's event thread),
    over a connection that carries nothing else, and that is reopened when it dies. One thread
    opens at a time; the others wait at most OPEN_TIMEOUT, so a hung daemon holds one opener.
    """

    def __init__(self, uri: str, listener: DomainListener | None = None) -> None:
        self.uri = uri
        self.listener = listener
        self._lock = threading.Lock()  # guards _threads
        self._threads: dict[threading.Thread, libvirt.virConnect] = {}
        self._opening = threading.Lock()
        self._events: libvirt.virConnect | None = None
        self._probe = _Slot()
        self._stats = _Slot()
        self._type: str | None = None

    def _connection(self) -> libvirt.virConnect:
        """This thread's connection, opened or reopened as needed."""
        with self._lock:
            conn = self._threads.get(threading.current_thread())
        if conn is not None and conn.isAlive() and self._events_alive():
            return conn
        return self._bounded_open()

    def connection(self) -> libvirt.virConnect:
        """This thread's connection, for the other modules of this package (networks, snapshots)."""
        return self._connection()

    def _events_alive(self) -> bool:
        return self.listener is None or (self._events is not None and self._events.isAlive())

    def _bounded_open(self) -> libvirt.virConnect:
        # Opened in a thread of its own: a daemon that accepts the socket but never answers
        # (stopped, hung) would hold the caller forever, as libvirt has no deadline for this.
        if not self._opening.acquire(timeout=OPEN_TIMEOUT):
            raise HypervisorUnavailableError(f"{self.uri} does not answer (an open waits on it)")
        outcome: list[libvirt.virConnect | BaseException] = []
        opener = threading.Thread(
            target=self._open,
            args=(threading.current_thread(), outcome),
            name="libvirt-open",
            daemon=True,
        )
        opener.start()
        opener.join(OPEN_TIMEOUT)
        if not outcome:
            raise HypervisorUnavailableError(f"{self.uri} does not answer (waited {OPEN_TIMEOUT:.0f}s)")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def _open(
        self,
        caller: threading.Thread,
        outcome: list[libvirt.virConnect | BaseException],
    ) -> None:
        """Open a connection for ``caller`` (and the events' one if it died); then let the next
        opener in. An open that outlasts the caller's wait still becomes its connection, found
        on its next call. Connections of threads that ended are closed here."""
        try:
            self._sweep()
            if not self._events_alive():
                events = self._open_one()
                self._subscribe(events)
                old, self._events = self._events, events
                if old is not None:
                    self._close_quietly(old)
            conn = self._open_one()
            self._type = str(conn.getType())
            with self._lock:
                stale = self._threads.get(caller)
                self._threads[caller] = conn
            if stale is not None:
                self._close_quietly(stale)
            outcome.append(conn)
        except BaseException as exc:  # reported to the caller, if it still waits
            outcome.append(exc)
        finally:
            self._opening.release()

    def _open_one(self) -> libvirt.virConnect:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise HypervisorUnavailableError(f"cannot connect to {self.uri}: {exc}") from exc
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
        except libvirt.libvirtError as exc:  # test:///, or no event loop (a one-off tool)
            log.debug("no keepalive on %s: %s", self.uri, exc)
        return conn

    def _sweep(self) -> None:
        with self._lock:
            ended = [thread for thread in self._threads if not thread.is_alive()]
            conns = [self._threads.pop(thread) for thread in ended]
        for conn in conns:
            self._close_quietly(conn)

    @staticmethod
    def _close_quietly(conn: libvirt.virConnect) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()

    def _subscribe(self, conn: libvirt.virConnect) -> None:
        listener = self.listener
        assert listener is not None

        def on_lifecycle(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
            try:
                listener(dom.name(), _EVENT_NAMES.get(event, str(event)))
            except Exception:  # an exception must not escape into libvirt's C event loop
                log.exception("domain event listener failed")

        conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)

    def connections(self) -> int:
        """Open connections, the events' one included (for the agent's metrics and tests)."""
        with self._lock:
            count = len(self._threads)
        return count + (self._events is not None) + (self._probe.conn is not None)

    def close(self) -> None:
        with self._lock:
            conns = list(self._threads.values())
            self._threads.clear()
        conns += [c for c in (self._events, self._probe.conn) if c is not None]
        self._events = self._probe.conn = None
        for conn in conns:
            self._close_quietly(conn)

    def _slot_connection(self, slot: _Slot) -> libvirt.virConnect:
        """The slot's connection, opened again if it died (the caller holds the slot's lock)."""
        if slot.conn is None or not slot.conn.isAlive():
            if slot.conn is not None:
                self._close_quietly(slot.conn)
            slot.conn = None
            slot.conn = self._open_one()
        return slot.conn

    def reachable(self) -> str | None:
        """None when libvirtd answers now, else why not (for /readyz and /health). Probes share
        one connection, so threads made for probing do not each open one; one probes at a time."""
        slot = self._probe
        if not slot.lock.acquire(blocking=False):
            return "an earlier probe still waits for libvirtd"
        try:
            self._slot_connection(slot).getLibVersion()
        except HypervisorError as exc:
            return str(exc)
        except libvirt.libvirtError as exc:
            return str(hypervisor_error(exc))
        finally:
            slot.lock.release()
        return None

    def all_domain_stats(self) -> list[tuple[str, dict[str, Any]]]:
        """libvirt's statistics of every domain of the node in one call (/metrics): state, CPU,
        balloon, vCPUs, interfaces and disks. Scrapes share one connection, one at a time."""
        slot = self._stats
        with slot.lock:
            try:
                listed = self._slot_connection(slot).getAllDomainStats(STATS, 0)
            except libvirt.libvirtError as exc:
                raise hypervisor_error(exc) from exc
        return [(domain.name(), dict(values)) for domain, values in listed]

    @property
    def runs_qemu(self) -> bool:
        """Whether domains are real QEMU processes that hold their images open (libvirt's test
        driver runs nothing): disks of a running domain then change only through QEMU."""
        if self._type is None:
            self._connection()
        return self._type == "QEMU"

    def capabilities(self) -> str:
        """libvirt's capabilities XML of this host (its security drivers among them)."""
        try:
            return str(self._connection().getCapabilities())
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc) from exc

    def capacity(self) -> tuple[int, int]:
        """(logical CPUs, memory in bytes) of the host."""
        try:
            info = self._connection().getInfo()
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc) from exc
        return int(info[2]), int(info[1]) * 2**20

    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self._connection().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise hypervisor_error(exc) from exc

    def require(self, name: str) -> libvirt.virDomain:
        dom = self.lookup(name)
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
        observed = observe(dom.XMLDesc(0))
        meta = observed.metadata
        owner = meta.owner if meta else None
        return DomainInfo(
            name=dom.name(),
            uuid=dom.UUIDString(),
            owner=owner,
            actual=Actual(
                folded,
                shutoff,
                meta.spec_hash if meta else None,
                bool(dom.isPersistent()),
                owner.uid if owner else None,
            ),
            vcpus=int(vcpus),
            memory_kib=int(max_mem),
            console_log=observed.console_log,
            run_id=int(dom.ID()) if dom.isActive() else None,
        )

    def describe(self, name: str) -> DomainInfo | None:
        try:
            dom = self.lookup(name)
            return None if dom is None else self._info(dom)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None  # undefined between the lookup and the look
            raise hypervisor_error(exc) from exc

    def owned_domains(self) -> list[DomainInfo]:
        """Every domain whose metadata names a VM: the agent's, found without guessing from names."""
        try:
            domains = self._connection().listAllDomains(0)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc) from exc
        infos = []
        for dom in domains:
            try:
                infos.append(self._info(dom))
            except libvirt.libvirtError as exc:
                # Undefined between the listing and the look: gone, which is no error.
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise hypervisor_error(exc) from exc
        return [info for info in infos if info.owner is not None]

    def domain_xml(self, name: str) -> str:
        try:
            return str(self.require(name).XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc) from exc

    def define(self, xml: str) -> str:
        try:
            return str(self._connection().defineXML(xml).UUIDString())
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, "cannot define the domain") from exc

    def _call(self, name: str, verb: str, *args: int, missing_ok: bool = False) -> None:
        dom = self.lookup(name)
        if dom is None:
            if missing_ok:
                return
            raise HypervisorError(f"domain {name} does not exist")
        try:
            getattr(dom, verb)(*args)
        except libvirt.libvirtError as exc:
            if missing_ok and exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return
            # Stopping a stopped domain is what we wanted anyway.
            if (
                verb in ("destroy", "shutdown", "shutdownFlags")
                and exc.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID
            ):
                return
            raise hypervisor_error(exc, f"cannot {verb} {name}") from exc

    def addresses(self, name: str) -> dict[str, dict[str, str]]:
        """MAC -> {source: first IPv4 address} of a running domain, from the libvirt network's
        DHCP leases ("lease") and from the guest agent when one answers ("guest-agent"). Empty
        when neither knows yet: that says nothing about the addresses a guest has. Empty on
        libvirt's test driver too, which makes addresses up for any domain."""
        dom = self.lookup(name)
        if dom is None or not self.runs_qemu:
            return {}
        found: dict[str, dict[str, str]] = {}
        for source, label in (
            (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, "lease"),
            (libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT, "guest-agent"),
        ):
            try:
                ifaces = dom.interfaceAddresses(source)
            except libvirt.libvirtError:
                continue  # no leases on this network, or no guest agent: not an error
            for iface in (ifaces or {}).values():
                mac = (iface.get("hwaddr") or "").lower()
                for addr in iface.get("addrs") or []:
                    if mac and addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                        found.setdefault(mac, {}).setdefault(label, str(addr["addr"]))
        return found

    def start(self, name: str) -> None:
        self._call(name, "create")

    def suspend(self, name: str) -> None:
        self._call(name, "suspend")

    def resume(self, name: str) -> None:
        self._call(name, "resume")

    def shutdown(self, name: str) -> None:
        """Ask the guest to power off (ACPI); returns at once."""
        if not self.runs_qemu:
            self._call(name, "shutdown", missing_ok=True)  # the test driver takes no flags
            return
        # ACPI, said explicitly: with no flags, libvirt's QEMU driver asks the guest agent
        # first when the domain has one (and every domain has its channel), so whether a stop
        # went through ACPI would depend on the guest. The agent comes second, if needed.
        self._call(name, "shutdownFlags", libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN, missing_ok=True)

    def agent_shutdown(self, name: str) -> bool:
        """Ask the guest agent to power the guest off; returns at once. False when there is no
        agent to ask (none in the guest, or not answering): the grace period's end still comes."""
        dom = self.lookup(name)
        if dom is None or not self.runs_qemu:
            return False
        try:
            dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT)
        except libvirt.libvirtError as exc:
            log.info("%s: the guest agent cannot shut it down: %s", name, exc.get_error_message())
            return False
        return True

    def destroy(self, name: str) -> None:
        self._call(name, "destroy", missing_ok=True)

    def block_resize(self, name: str, path: str, size: int) -> None:
        try:
            self.require(name).blockResize(path, size, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot grow {path} of {name}") from exc

    def undefine(self, name: str) -> None:
        """Undefine, with the metadata of any memory snapshots (their data goes with the disks)."""
        dom = self.lookup(name)
        if dom is None:
            return
        flags = libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
        try:
            # A UEFI domain's NVRAM goes with it (libvirt refuses to undefine it otherwise).
            if observe(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).nvram is not None:
                flags |= libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
            try:
                dom.undefineFlags(flags)
            except libvirt.libvirtError as exc:
                if flags == libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA:
                    raise
                if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
                    raise
                # libvirt's test driver knows no NVRAM flag; it keeps no NVRAM file either.
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                raise hypervisor_error(exc, f"cannot undefine {name}") from exc
