"""What probes and /metrics cost an agent at N VMs per node, measured beside a baseline in the
same run.

- Probes: the agent's Prober with N VMs, each with a tcpSocket readiness probe every second,
  against a listener on 127.0.0.1 (loopback only; the probes' own code path, no guest). CPU
  seconds the process spends per wall second over a window, against the same process idle; the
  listener accepts in the same process, so both ends of each connection are counted.
- Scrape: the agent's per-VM collector over N running domains of libvirt's test driver (the
  same bulk statistics call the agent makes), rendered as Prometheus text; percentiles of the
  scrape time, against a registry without the per-VM collector.

    .venv/bin/python -m bench.probes_scrape --vms 200
"""

import argparse
import resource
import socket
import statistics
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.probes.prober import Prober, ProbeTarget
from formation_vmm.agent.vms.vm_metrics import ProbeCollector, VmLabels, VmStatsCollector
from formation_vmm.api.models import Probe


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_per_second(window: float) -> float:
    start_cpu, start = cpu_seconds(), time.monotonic()
    time.sleep(window)
    return (cpu_seconds() - start_cpu) / (time.monotonic() - start)


def accept_forever(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.close()


def bench_probes(vms: int, window: float) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    threading.Thread(target=accept_forever, args=(listener,), daemon=True).start()
    port = listener.getsockname()[1]
    prober = Prober(lambda _domain, _timeout: None, lambda _key: None)
    prober.start()
    idle = cpu_per_second(window)
    probe = Probe.model_validate({"tcpSocket": {"port": port}, "periodSeconds": 1})
    threads_idle = threading.active_count()
    for i in range(vms):
        prober.update(f"vm-{i}", ProbeTarget(f"dom-{i}", "1", "127.0.0.1", readiness=probe))
    time.sleep(2)  # every probe has run once
    busy = cpu_per_second(window)
    ready = sum(1 for i in range(vms) if (r := prober.readiness(f"vm-{i}")) is not None and r.ready)
    threads_busy = threading.active_count()
    prober.close()
    listener.close()
    print(
        f"probes: {vms} VMs, one tcpSocket probe each per second: "
        f"{busy:.3f} CPU-s/s (idle baseline {idle:.3f}; {(busy - idle) / vms * 1000:.2f} ms CPU per probe), "
        f"{ready}/{vms} ready, threads {threads_idle} idle and {threads_busy} probing"
    )


def define_domains(hypervisor: Hypervisor, vms: int) -> dict[str, VmLabels]:
    conn = hypervisor.connection()
    owners = {}
    for i in range(vms):
        name = f"bench-{i}"
        xml = (
            f"<domain type='test'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type>hvm</type></os><devices>"
            f"<disk type='file' device='disk'><source file='/bench/{name}.qcow2'/><target dev='vda'/></disk>"
            "<interface type='network'><source network='default'/></interface>"
            "</devices></domain>"
        )
        conn.defineXML(xml).create()
        owners[name] = VmLabels("bench", name, "Running", ("eth0",), True)
    return owners


def timed(fn: Callable[[], bytes], rounds: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        size = len(fn())
        times.append(time.perf_counter() - start)
    return sorted(times), size


def bench_scrape(vms: int, rounds: int) -> None:
    hypervisor = Hypervisor("test:///default")
    owners = define_domains(hypervisor, vms)
    base = CollectorRegistry()
    full = CollectorRegistry()
    full.register(VmStatsCollector(hypervisor.all_domain_stats, lambda: owners, "bench-node"))
    states = {name: {"readiness": True} for name in owners}
    full.register(ProbeCollector(lambda: states, lambda: owners, "bench-node"))
    empty, _ = timed(lambda: generate_latest(base), rounds)
    times, size = timed(lambda: generate_latest(full), rounds)
    p50, p95 = statistics.median(times), times[int(0.95 * (len(times) - 1))]
    print(
        f"scrape: {vms} running domains: p50 {p50 * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
        f"{size / 1024:.0f} KiB of text (empty registry p50 {statistics.median(empty) * 1000:.2f} ms; "
        f"{p50 / vms * 1e6:.0f} us per VM)"
    )
    hypervisor.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--window", type=float, default=10.0, help="seconds CPU is measured over")
    parser.add_argument("--rounds", type=int, default=50, help="scrapes timed")
    args = parser.parse_args()
    bench_probes(args.vms, args.window)
    bench_scrape(args.vms, args.rounds)


if __name__ == "__main__":
    main()
