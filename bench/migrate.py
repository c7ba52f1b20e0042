"""Live migration time and guest downtime on two real nodes of this machine (each its own
libvirtd, ``devcluster.libvirt_node``), through the agent's data path
(``agent/hypervisor/migration.py``: memory and the disk's top overlay over UNIX sockets), with
the test guest on QEMU's TCG.

    .venv/bin/python -m bench.migrate --runs 5

For a 256 MiB and a 1 GiB guest, idle (it only counts, once a second) and writing memory
(``vmm.dirty``: it rewrites --dirty-mib MiB with random data over and over), one guest is
moved back and forth between the nodes --runs times, each time onto fresh overlays. From
libvirt's finished job on the target: the move's time, the downtime (how long the guest was
paused) and the memory sent. The idle guest of the same size, measured in the same run, is the
baseline: the writing guest's figures are also given as ratios of it. Each case runs straight
between the libvirtds (``direct``) and through two agents' migration relays (``relay``: TLS
between them, as between machines); the relay's figures are also given as ratios of the direct
ones of the same run. Every guest must keep
counting under one boot id through all its moves (checked), or the run fails.

Needs root, libvirtd and QEMU (hack/install-system-deps.sh). Stops both daemons and every
guest on success, failure, SIGINT and SIGTERM.
"""

import argparse
import platform
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench.create_vms import percentile
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.hypervisor.migration import abort, completed_job, migrate
from formation_vmm.agent.migration.relay import Identity, Relay, Stream
from formation_vmm.devcluster import guest
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.processes import ProcessTable
from formation_vmm.host import qemu_img

MIB = 1 << 20
# A move that has not finished by then is aborted and the run fails: a guest that dirties memory
# faster than it can be sent never converges without auto-converge.
MOVE_TIMEOUT = 120.0
RELAY_DIR = "/run/formation-vmm/migration"  # as each node's libvirtd sees its relay's directory


@dataclass(frozen=True)
class Move:
    seconds: float
    downtime_ms: float
    sent_mib: float
    iterations: int


@dataclass(frozen=True)
class Case:
    memory_mib: int
    dirty_mib: int

    @property
    def label(self) -> str:
        size = f"{self.memory_mib // 1024} GiB" if self.memory_mib >= 1024 else f"{self.memory_mib} MiB"
        return f"{size}, " + (f"writing {self.dirty_mib} MiB" if self.dirty_mib else "idle")


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def _write_rate(log: Path, dirty_mib: int, window: float = 5.0) -> float:
    """MiB/s the guest writes: its passes over ``dirty_mib`` within ``window`` seconds."""

    def passes() -> int:
        return log.read_text(errors="replace").count(guest.DIRTY)

    _wait(lambda: passes() > 0, 180, "the guest to write memory")
    before = passes()
    time.sleep(window)
    return (passes() - before) * dirty_mib / window


class Pair:
    """Two node libvirtds, a guest on one of them, and a way to move it to the other."""

    def __init__(self, root: Path) -> None:
        self.root = root
        table = ProcessTable(root / "pids.json")
        self.nodes = [LibvirtNode(root / n, f"bench-mig-{n}", table) for n in ("a", "b")]
        self.kernel, self.initrd = guest.install(root / "images")
        self.hypervisors: list[Hypervisor] = []
        self.relays: list[Relay] = []

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        self.hypervisors = [Hypervisor(n.uri) for n in self.nodes]
        # Each node's relay as its agent runs it: TLS on 127.0.0.1, its sockets where the
        # node's libvirtd sees /run/formation-vmm/migration; every stream allowed (no API here).
        ids = [Identity.load_or_create(self.root / f"relay-{i}", n.name) for i, n in enumerate(self.nodes)]
        certificates = {n.name: ident.certificate for n, ident in zip(self.nodes, ids, strict=True)}
        for node, ident in zip(self.nodes, ids, strict=True):
            relay = Relay(
                node.name, ident, ("127.0.0.1", 0), Path(RELAY_DIR), node.relay_dir, node.socket,
                lambda _source, _stream: None, certificates.get,
            )  # fmt: skip
            relay.start()
            self.relays.append(relay)

    def stop(self) -> None:
        for relay in self.relays:
            relay.stop()
        for node in self.nodes:
            node.stop()

    def _dir(self, index: int, case: Case) -> Path:
        return self.root / f"{'ab'[index]}-disks" / f"{case.memory_mib}-{case.dirty_mib}"

    def _xml(self, index: int, case: Case, uid: str) -> str:
        d = self._dir(index, case)
        cmdline = "vmm.tick=1" + (f" vmm.dirty={case.dirty_mib}" if case.dirty_mib else "")
        disk, console = d / "top.qcow2", d / "console.log"
        return guest.bare_domain_xml(
            "bench-mig", uid, self.kernel, self.initrd, disk, console, case.memory_mib, cmdline
        )

    def _fresh_overlay(self, index: int, case: Case) -> None:
        d = self._dir(index, case)
        d.mkdir(parents=True, exist_ok=True)
        base, top = d / "base.qcow2", d / "top.qcow2"
        if not base.exists():  # the same base on each node, as the image cache gives
            qemu_img.run("create", "-f", "qcow2", str(base), "64M")
        top.unlink(missing_ok=True)
        qemu_img.run("create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top))

    def run(self, case: Case, runs: int, via: str = "direct") -> tuple[list[Move], float]:
        """The moves, and how fast the guest writes memory (MiB/s, from its own passes over
        ``case.dirty_mib`` in a 5 s window before the first move; QEMU's dirty rate is not in a
        finished job's figures)."""
        uid = str(uuid.uuid4())
        for index in (0, 1):  # an earlier run's guest of this case left its ticks there
            (self._dir(index, case) / "console.log").unlink(missing_ok=True)
        self._fresh_overlay(0, case)
        self.hypervisors[0].connection().defineXML(self._xml(0, case, uid)).create()
        at = 0
        try:
            log = self._dir(0, case) / "console.log"
            _wait(lambda: len(guest.ticks(log)) >= 2, 180, f"the {case.label} guest to boot")
            boot = guest.ticks(log)[-1][1]
            rate = _write_rate(log, case.dirty_mib) if case.dirty_mib else 0.0
            moves = []
            for n in range(runs):
                target = 1 - at
                self._fresh_overlay(target, case)
                tag = f"{case.memory_mib}-{case.dirty_mib}-{via}-{n}"
                moves.append(self._move(at, target, case, uid, tag, via))
                at = target
                on = self._dir(at, case) / "console.log"
                _wait(lambda: len(guest.ticks(on)) >= 1, 60, "the guest to count on, on the target")  # noqa: B023
                seen = {b for _, b in guest.ticks(on)}
                if seen != {boot}:
                    raise RuntimeError(f"the guest booted again in move {n + 1}: boot ids {seen}, not {boot}")
            return moves, rate
        finally:
            dom = self.hypervisors[at].require("bench-mig")
            dom.destroy()
            dom.undefine()

    def _move(self, source: int, target: int, case: Case, uid: str, tag: str, via: str) -> Move:
        failed: list[Exception] = []

        def go() -> None:
            target_xml = self._xml(target, case, uid)
            try:
                if via == "direct":
                    sockets = f"unix://{self.root}/memory-{tag}.sock", f"unix://{self.root}/disks-{tag}.sock"
                    to = self.nodes[target].uri
                    migrate(self.hypervisors[source], "bench-mig", to, target_xml, *sockets, ["vda"])
                    return
                move = str(uuid.uuid4())
                self.relays[target].incoming(move)
                dial = f"127.0.0.1:{self.relays[target].port}"
                peer = self.relays[target].identity.certificate
                with self.relays[source].outgoing(Stream("bench", "move", move, ""), dial, peer) as route:
                    migrate(self.hypervisors[source], "bench-mig", route.libvirtd_uri, target_xml,
                            route.memory_uri, route.disks_uri, ["vda"])  # fmt: skip
                self.relays[target].forget(move)
            except HypervisorError as exc:
                failed.append(exc)

        mover = threading.Thread(target=go)
        mover.start()
        mover.join(MOVE_TIMEOUT)
        if mover.is_alive():
            abort(self.hypervisors[source], "bench-mig")
            mover.join(30)
            raise RuntimeError(f"{case.label}: the move did not finish in {MOVE_TIMEOUT:.0f} s (aborted)")
        if failed:
            raise failed[0]
        job = completed_job(self.hypervisors[target], "bench-mig")
        return Move(
            seconds=job["time_elapsed"] / 1000,
            downtime_ms=float(job["downtime"]),
            sent_mib=job.get("memory_processed", 0) / MIB,
            iterations=job.get("memory_iteration", 0),
        )


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    # Unwinds through the finally blocks, which stop the guests and both daemons.
    raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")


def _row(
    label: str, case: Case, moves: list[Move], rate: float, baseline: list[Move] | None, against: str = "idle"
) -> str:
    times = [m.seconds for m in moves]
    down = [m.downtime_ms for m in moves]
    sent = [m.sent_mib for m in moves]
    text = (
        f"{label:34} move p50 {percentile(times, 0.5):6.2f} s  p95 {percentile(times, 0.95):6.2f} s   "
        f"downtime p50 {percentile(down, 0.5):6.0f} ms  p95 {percentile(down, 0.95):6.0f} ms   "
        f"sent p50 {percentile(sent, 0.5):7.1f} MiB   "
        f"passes p50 {percentile([float(m.iterations) for m in moves], 0.5):.0f}"
    )
    if case.dirty_mib:
        text += f"\n{'':34} the guest writes {rate:.0f} MiB/s"
    if baseline:
        base_time = percentile([m.seconds for m in baseline], 0.5)
        base_down = percentile([m.downtime_ms for m in baseline], 0.5)
        text += (
            f"\n{'':34} vs {against}: move {percentile(times, 0.5) / base_time:.2f}x, "
            f"downtime {percentile(down, 0.5) / base_down:.2f}x"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="moves per guest (default 5)")
    parser.add_argument(
        "--dirty-mib", type=int, default=64, help="memory the writing guests rewrite (default 64)"
    )
    parser.add_argument("--sizes", default="256,1024", help="guest memory sizes in MiB (default 256,1024)")
    parser.add_argument(
        "--via",
        default="direct,relay",
        help="direct (UNIX sockets both libvirtds see), relay (through two agents' TLS relays), or both "
        "(default; the relay's figures then also as ratios of the direct ones of the same run)",
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="vmm-bench-mig-") as tmp:
        pair = Pair(Path(tmp))
        try:
            pair.start()
            print(f"machine: {platform.node()} {platform.machine()}; two node libvirtds, QEMU TCG guests")
            print(f"{args.runs} moves per guest, memory and overlay over UNIX sockets, no bandwidth limit")
            for size in sizes:
                idle: dict[str, list[Move]] = {}
                for case in (Case(size, 0), Case(size, args.dirty_mib)):
                    direct: list[Move] | None = None
                    for via in args.via.split(","):
                        moves, rate = pair.run(case, args.runs, via)
                        label = f"{case.label}, {via}"
                        if via == "relay" and direct is not None:
                            print(_row(label, case, moves, rate, direct, "direct"), flush=True)
                        else:
                            print(_row(label, case, moves, rate, idle.get(via)), flush=True)
                        direct = moves if via == "direct" else direct
                        if not case.dirty_mib:
                            idle[via] = moves
        finally:
            pair.stop()


if __name__ == "__main__":
    main()
