"""Per-VM Prometheus series on the agent's /metrics, from libvirt's bulk statistics: one call
per scrape for every domain of the node (``virConnectGetAllDomainStats``), never one per VM.

``families`` (pure) turns libvirt's flat statistics into the ``vmm_vm_*`` families, labelled
``namespace``, ``name`` and ``node``; ``VmStatsCollector`` asks libvirt at scrape time, bounded: a
hung libvirtd makes a scrape say ``vmm_vm_stats_up 0``, never a scrape that hangs. Names and
their KubeVirt equivalents: docs/monitoring.md."""

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, get_args

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from formation_vmm.api.models import VmPhase

log = logging.getLogger(__name__)

KIB = 1024
NS = 1e-9
# A scrape waits this long for libvirt, once: while that call hangs, scrapes answer at once.
STATS_TIMEOUT_SECONDS = 2.0
LABELS = ["namespace", "name", "node"]


@dataclass(frozen=True)
class VmLabels:
    namespace: str
    name: str
    phase: str
    networks: tuple[str, ...] = ()  # the spec's interface names, in the domain's order
    ready: bool = False  # the VM's Ready condition is True


DomainStats = tuple[str, dict[str, Any]]  # (domain name, libvirt's flat statistics)

# (family suffix, help, libvirt key below block.N., scale)
_DISK = (
    ("read_bytes_total", "Bytes read from the disk.", "rd.bytes", 1.0),
    ("write_bytes_total", "Bytes written to the disk.", "wr.bytes", 1.0),
    ("read_requests_total", "Read requests to the disk.", "rd.reqs", 1.0),
    ("write_requests_total", "Write requests to the disk.", "wr.reqs", 1.0),
    ("flush_requests_total", "Flush requests to the disk.", "fl.reqs", 1.0),
    ("read_seconds_total", "Time spent on reads from the disk.", "rd.times", NS),
    ("write_seconds_total", "Time spent on writes to the disk.", "wr.times", NS),
)
# (family suffix, help, libvirt key below net.N.)
_NET = (
    ("receive_bytes_total", "Bytes received on the interface.", "rx.bytes"),
    ("transmit_bytes_total", "Bytes sent on the interface.", "tx.bytes"),
    ("receive_packets_total", "Packets received on the interface.", "rx.pkts"),
    ("transmit_packets_total", "Packets sent on the interface.", "tx.pkts"),
    ("receive_errors_total", "Receive errors on the interface.", "rx.errs"),
    ("transmit_errors_total", "Transmit errors on the interface.", "tx.errs"),
    ("receive_drops_total", "Received packets dropped on the interface.", "rx.drop"),
    ("transmit_drops_total", "Transmitted packets dropped on the interface.", "tx.drop"),
)
PHASES = get_args(VmPhase)


def families(stats: Iterable[DomainStats], owners: dict[str, VmLabels], node: str) -> list[Metric]:
    """The vmm_vm_* families for the domains of ``stats`` that belong to a VM of ``owners``
    (keyed by domain name); other domains on the node are not ours to report."""
    cpu = CounterMetricFamily("vmm_vm_cpu_seconds", "CPU time the VM's QEMU used.", labels=LABELS)
    vcpus = GaugeMetricFamily("vmm_vm_vcpus", "vCPUs the VM runs with.", labels=LABELS)
    assigned = GaugeMetricFamily(
        "vmm_vm_memory_assigned_bytes", "Memory the guest has now (the balloon's size).", labels=LABELS
    )
    maximum = GaugeMetricFamily("vmm_vm_memory_maximum_bytes", "Memory the VM was given.", labels=LABELS)
    rss = GaugeMetricFamily(
        "vmm_vm_memory_resident_bytes", "Resident memory of the VM's QEMU.", labels=LABELS
    )
    unused = GaugeMetricFamily(
        "vmm_vm_memory_unused_bytes", "Memory the guest leaves unused (balloon driver).", labels=LABELS
    )
    disk = {
        suffix: CounterMetricFamily(
            f"vmm_vm_disk_{suffix.removesuffix('_total')}", text, labels=[*LABELS, "disk"]
        )
        for suffix, text, _, _ in _DISK
    }
    net = {
        suffix: CounterMetricFamily(
            f"vmm_vm_network_{suffix.removesuffix('_total')}", text, labels=[*LABELS, "interface"]
        )
        for suffix, text, _ in _NET
    }
    ready = GaugeMetricFamily("vmm_vm_ready", "1 while the VM's Ready condition is True.", labels=LABELS)
    phase = GaugeMetricFamily(
        "vmm_vm_phase",
        "1 for the VM's phase as its status says it, 0 for the others.",
        labels=[*LABELS, "phase"],
    )
    for domain, values in stats:
        owner = owners.get(domain)
        if owner is None:
            continue
        base = [owner.namespace, owner.name, node]
        if "cpu.time" in values:
            cpu.add_metric(base, values["cpu.time"] * NS)
        if "vcpu.current" in values:
            vcpus.add_metric(base, values["vcpu.current"])
        for family, key in (
            (assigned, "balloon.current"),
            (maximum, "balloon.maximum"),
            (rss, "balloon.rss"),
        ):
            if key in values:
                family.add_metric(base, values[key] * KIB)
        if "balloon.unused" in values:
            unused.add_metric(base, values["balloon.unused"] * KIB)
        for i in range(int(values.get("block.count", 0))):
            name = str(values.get(f"block.{i}.name", i))
            for suffix, _, key, scale in _DISK:
                if f"block.{i}.{key}" in values:
                    disk[suffix].add_metric([*base, name], values[f"block.{i}.{key}"] * scale)
        for i in range(int(values.get("net.count", 0))):
            name = owner.networks[i] if i < len(owner.networks) else str(values.get(f"net.{i}.name", i))
            for suffix, _, key in _NET:
                if f"net.{i}.{key}" in values:
                    net[suffix].add_metric([*base, name], values[f"net.{i}.{key}"])
        ready.add_metric(base, 1.0 if owner.ready else 0.0)
        for each in PHASES:
            phase.add_metric([*base, each], 1.0 if owner.phase == each else 0.0)
    return [cpu, vcpus, assigned, maximum, rss, unused, *disk.values(), *net.values(), ready, phase]


def summary(values: dict[str, Any]) -> dict[str, float]:
    """One VM's counters for ``kubectl vm top``, totals over its disks and interfaces, in base
    units (the plugin turns two of them into rates)."""
    disks = range(int(values.get("block.count", 0)))
    nets = range(int(values.get("net.count", 0)))
    return {
        "cpuSeconds": values.get("cpu.time", 0) * NS,
        "vcpus": float(values.get("vcpu.current", 0)),
        "memoryResidentBytes": float(values.get("balloon.rss", 0) * KIB),
        "memoryBytes": float(values.get("balloon.maximum", 0) * KIB),
        "diskReadBytes": float(sum(values.get(f"block.{i}.rd.bytes", 0) for i in disks)),
        "diskWriteBytes": float(sum(values.get(f"block.{i}.wr.bytes", 0) for i in disks)),
        "networkReceiveBytes": float(sum(values.get(f"net.{i}.rx.bytes", 0) for i in nets)),
        "networkTransmitBytes": float(sum(values.get(f"net.{i}.tx.bytes", 0) for i in nets)),
    }


class VmStatsCollector(Collector):
    """Registered on the agent's registry: at each scrape, one bulk call to libvirt."""

    def __init__(
        self,
        stats: Callable[[], list[DomainStats]],
        owners: Callable[[], dict[str, VmLabels]],
        node: str,
        timeout: float = STATS_TIMEOUT_SECONDS,
    ) -> None:
        self.stats = stats
        self.owners = owners
        self.node = node
        self.timeout = timeout
        self._lock = threading.Lock()  # one libvirt call in flight, however many scrapes
        self._running: threading.Thread | None = None

    def describe(self) -> list[Metric]:
        return []  # not known before a scrape: do not call libvirt at registration

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "vmm_vm_stats_up",
            "1 when libvirt answered this scrape's statistics call in time.",
            labels=["node"],
        )
        result = self._bounded()
        up.add_metric([self.node], 0.0 if result is None else 1.0)
        yield up
        if result is not None:
            yield from families(result, self.owners(), self.node)

    def _bounded(self) -> list[DomainStats] | None:
        answer: list[list[DomainStats]] = []

        def call() -> None:
            try:
                answer.append(self.stats())
            except Exception as exc:  # an unreachable libvirtd: this scrape has no VM series
                log.debug("domain statistics: %s", exc)

        with self._lock:
            if self._running is not None and self._running.is_alive():
                return None  # the last call still waits on libvirt: do not queue another
            thread = threading.Thread(target=call, name="vm-stats", daemon=True)
            self._running = thread
            thread.start()
        thread.join(self.timeout)
        return answer[0] if answer else None


class ProbeCollector:
    """``vmm_vm_probe_passing``: 1 while a VM's readiness or liveness probe passes, 0 while it
    fails (a readiness probe counts as failing until it first passes); from the prober's memory,
    no I/O."""

    def __init__(
        self,
        states: Callable[[], dict[str, dict[str, bool]]],
        owners: Callable[[], dict[str, VmLabels]],
        node: str,
    ) -> None:
        self.states = states
        self.owners = owners
        self.node = node

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        passing = GaugeMetricFamily(
            "vmm_vm_probe_passing",
            "1 while the VM's probe passes, 0 while it fails.",
            labels=[*LABELS, "probe"],
        )
        owners = self.owners()
        for domain, probes in self.states().items():
            owner = owners.get(domain)
            if owner is None:
                continue
            for kind, ok in sorted(probes.items()):
                passing.add_metric([owner.namespace, owner.name, self.node, kind], 1.0 if ok else 0.0)
        yield passing
