"""Readiness and liveness probes of the VMs on this node, run from the node.

One thread runs an asyncio loop that holds every probe as a coroutine: a node with hundreds of
probed VMs needs no thread per probe, and at most ``max_concurrent`` checks are in flight at
once. ``tcpSocket`` and ``httpGet`` connect to the address the controller assigned the VM's
first interface (never an address a guest reports: a guest must not point the node's probes at
the node's own services); ``guestAgentPing`` asks qemu-guest-agent through libvirt, in a small
pool of threads (libvirt's call blocks). A guest that accepts and never answers holds a thread
for its whole timeout, so one tenant's guests must not fail their neighbours' probes: a VM has
at most one ping in flight, a ping's timeout starts when a thread takes it (not while it
waits for one), and a check that could not run (its VM's last ping still running, or no thread
free within the probe's period) is unknown: it counts neither way.

Where the node's VM networks live in a network namespace of their own (the dev cluster, the
tests), the loop's thread enters it first (``setns`` moves only the calling thread), so every
socket the probes open is made there.

A probe's verdict changing calls ``on_change`` with the VM's key: the VM's sync then reads
``readiness`` and ``liveness_failure`` and writes the status or restarts the guest.
"""

import asyncio
import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from formation_vmm.agent.plan import DomainState
from formation_vmm.agent.probes.probe_state import ProbeKind, ProbeRecord, Readiness, describe, readiness_of
from formation_vmm.agent.state import DomainInfo
from formation_vmm.api.models import Probe, VirtualMachine
from formation_vmm.config import Settings
from formation_vmm.domain.build import assigned_addresses

log = logging.getLogger(__name__)

_CLONE_NEWNET = 0x40000000
# What an httpGet probe reads of the answer: the status line is all it needs.
_STATUS_LINE_MAX = 1024

NO_ADDRESS = "the VM has no assigned address to probe (its first interface is on no nat or isolated network)"
GuestPing = Callable[[str, float], str | None]  # (domain, timeout) -> None when it answers, else why not


@dataclass(frozen=True)
class ProbeTarget:
    """What to probe for one VM's current run; a new run (or new probes) starts over."""

    domain: str
    run: str  # the domain's current run (its start time): results of an earlier run do not count
    address: str | None  # the assigned address of the VM's first interface
    readiness: Probe | None = None
    liveness: Probe | None = None


class _Watch:
    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self.records: dict[ProbeKind, ProbeRecord] = {}
        self.tasks: list[asyncio.Task[None]] = []


def probe_target(vm: VirtualMachine, domain: DomainInfo | None, stopping: bool) -> ProbeTarget | None:
    """What to probe for the VM now: nothing without probes, or unless its domain runs (not
    paused, not being stopped)."""
    spec = vm.spec
    if spec.readiness_probe is None and spec.liveness_probe is None:
        return None
    if domain is None or domain.actual.state is not DomainState.RUNNING or stopping or spec.paused:
        return None
    first = spec.networks[0].name if spec.networks else None
    address = assigned_addresses(vm).get(first) if first else None
    return ProbeTarget(domain.name, str(domain.run_id), address, spec.readiness_probe, spec.liveness_probe)


def enter_netns(path: Path) -> None:
    """Move the calling thread into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot enter network namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Prober:
    @staticmethod
    def started(settings: Settings, ping: GuestPing, on_change: Callable[[str], None]) -> "Prober":
        """The node's probe loop, started in the network namespace its VM networks live in (a
        namespace that cannot be entered stops the agent with the reason)."""
        test_driver = settings.libvirt_uri.startswith("test:")
        prober = Prober(
            ping,
            on_change,
            netns=settings.probe_netns,
            max_concurrent=settings.probe_concurrency,
            refuse="libvirt's test driver runs no guest to probe" if test_driver else None,
        )
        try:
            prober.start()
        except OSError as exc:
            raise SystemExit(f"cannot start the probes: {exc}") from exc
        return prober

    def __init__(
        self,
        ping: GuestPing,
        on_change: Callable[[str], None],
        netns: Path | None = None,
        max_concurrent: int = 64,
        ping_threads: int = 4,
        refuse: str | None = None,
    ) -> None:
        self.ping = ping
        # Why no probe may run on this node (libvirt's test driver: no guest answers, and the
        # assigned addresses lead nowhere on this host): every check fails with it, unsent.
        self.refuse = refuse
        self.on_change = on_change
        self.netns = netns
        self.max_concurrent = max_concurrent
        self._pool = ThreadPoolExecutor(ping_threads, thread_name_prefix="guest-ping")
        self._pinging: set[str] = set()  # domains with a ping in flight (the loop's thread only)
        self._lock = threading.Lock()  # guards _watches' records as other threads read them
        self._watches: dict[str, _Watch] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._limit: asyncio.Semaphore | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # --- life --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            if self.netns is not None:
                enter_netns(self.netns)
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._limit = asyncio.Semaphore(self.max_concurrent)
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        loop.run_forever()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._shutdown()))
            if self._thread is not None:
                self._thread.join(5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _shutdown(self) -> None:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()

    # --- what the syncs tell and ask ---------------------------------------------------------

    def update(self, key: str, target: ProbeTarget | None, ready_already: bool = False) -> None:
        """Probe ``key`` as ``target`` says from now on (None: not at all: no probes, or the VM
        is not running, is paused or stopping). The same target again changes nothing. With
        ``ready_already`` (a guest that arrived by live migration, ready at the source: the
        same run goes on) a new readiness record starts passing, until failureThreshold
        failures here say otherwise."""
        with self._lock:
            current = self._watches.get(key)
            if (current.target if current else None) == target:
                return
            if target is None or (target.readiness is None and target.liveness is None):
                self._watches.pop(key, None)
                watch = None
            else:
                watch = _Watch(target)
                if target.readiness is not None:
                    record = ProbeRecord.of("readiness", target.readiness)
                    record.passing = record.ever_passed = ready_already
                    watch.records["readiness"] = record
                if target.liveness is not None:
                    watch.records["liveness"] = ProbeRecord.of("liveness", target.liveness)
                self._watches[key] = watch
        loop = self._loop
        if loop is not None:
            loop.call_soon_threadsafe(self._restart_tasks, key, current, watch)

    def readiness(self, key: str) -> Readiness | None:
        """None when the VM has no readiness probe being run."""
        with self._lock:
            watch = self._watches.get(key)
            record = watch.records.get("readiness") if watch else None
            if watch is None or record is None or watch.target.readiness is None:
                return None
            return readiness_of(record, f"readiness probe {describe(watch.target.readiness)}")

    def liveness_failure(self, key: str) -> str | None:
        """Why the VM's liveness probe failed in its current run, or None."""
        with self._lock:
            watch = self._watches.get(key)
            record = watch.records.get("liveness") if watch else None
            if watch is None or record is None or record.passing or watch.target.liveness is None:
                return None
            what = describe(watch.target.liveness)
            return f"liveness probe {what} failed {record.failures} times: {record.message}"

    def states(self) -> dict[str, dict[str, bool]]:
        """domain -> probe kind -> passing, for /metrics."""
        with self._lock:
            return {
                w.target.domain: {kind: r.passing for kind, r in w.records.items()}
                for w in self._watches.values()
            }

    # --- the loop's side ---------------------------------------------------------------------

    def _restart_tasks(self, key: str, old: _Watch | None, new: _Watch | None) -> None:
        if old is not None:
            for task in old.tasks:
                task.cancel()
        if new is not None:
            for kind in new.records:
                new.tasks.append(asyncio.ensure_future(self._probe_forever(key, new, kind)))

    async def _probe_forever(self, key: str, watch: _Watch, kind: ProbeKind) -> None:
        target = watch.target
        probe = target.readiness if kind == "readiness" else target.liveness
        assert probe is not None and self._limit is not None
        await asyncio.sleep(probe.initial_delay_seconds)
        while True:
            async with self._limit:
                verdict = await self._check(target, probe)
            with self._lock:
                if self._watches.get(key) is not watch:
                    return  # replaced meanwhile
                changed = verdict is not None and watch.records[kind].record(*verdict)
            if changed:
                try:
                    self.on_change(key)
                except Exception:  # the probe loop must outlive its listener
                    log.exception("probe listener failed")
            await asyncio.sleep(probe.period_seconds)

    async def _check(self, target: ProbeTarget, probe: Probe) -> tuple[bool, str] | None:
        """(passed, what was seen), or None when the check could not run (unknown)."""
        timeout = float(probe.timeout_seconds)
        if self.refuse is not None:
            return False, self.refuse
        if probe.guest_agent_ping is not None:
            return await self._ping(target.domain, timeout, float(probe.period_seconds))
        if target.address is None:
            return False, NO_ADDRESS
        endpoint = probe.tcp_socket or probe.http_get
        port = endpoint.port if endpoint is not None else 0
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(target.address, port), timeout)
        except (OSError, TimeoutError) as exc:
            return False, f"cannot connect to {target.address}:{port}: {_why(exc)}"
        try:
            if probe.http_get is None:
                return True, f"{target.address}:{port} accepts connections"
            request = (
                f"GET {probe.http_get.path} HTTP/1.0\r\nHost: {target.address}:{port}\r\n"
                "User-Agent: formation-vmm-probe\r\nConnection: close\r\n\r\n"
            )
            writer.write(request.encode("ascii"))
            line = await asyncio.wait_for(reader.readline(), timeout)
            return _http_verdict(line[:_STATUS_LINE_MAX])
        except (OSError, TimeoutError, UnicodeError) as exc:
            return False, f"GET {probe.http_get.path if probe.http_get else ''} failed: {_why(exc)}"
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1)

    async def _ping(self, domain: str, timeout: float, queue_limit: float) -> tuple[bool, str] | None:
        if domain in self._pinging:
            return None  # its last ping still waits for the guest: one at a time per VM
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def run() -> str | None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(started.set)
            try:
                return self.ping(domain, timeout)
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._pinging.discard, domain)

        self._pinging.add(domain)
        try:
            future = self._pool.submit(run)
        except RuntimeError:  # the pool is shut down: the prober is closing
            self._pinging.discard(domain)
            return None
        try:
            await asyncio.wait_for(started.wait(), queue_limit)
        except TimeoutError:
            if future.cancel():  # never ran: other VMs' pings held every thread
                self._pinging.discard(domain)
                return None
        try:
            why = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout + 1)
        except TimeoutError:
            why = f"the guest agent did not answer within {timeout:.0f}s"
        return why is None, why or "the guest agent answers"


def _http_verdict(line: bytes) -> tuple[bool, str]:
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return False, "the answer is not HTTP"
    code = int(parts[1])
    return 200 <= code < 400, f"HTTP {code}"


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", not asyncio's "Connect call failed"
    return str(exc) or type(exc).__name__
