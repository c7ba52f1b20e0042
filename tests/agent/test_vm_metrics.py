"""libvirt's flat statistics into the vmm_vm_* families: the keys libvirt documents for a QEMU
domain (the real-QEMU tier checks them against a real guest), the labels, the units; domains that are
not ours are left out; a hung statistics call makes a scrape say so instead of hanging."""

import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from formation_vmm.agent.vms.vm_metrics import VmLabels, VmStatsCollector, families

pytestmark = pytest.mark.pure

QEMU_STATS = {
    "state.state": 1,
    "state.reason": 1,
    "cpu.time": 2_500_000_000,
    "cpu.user": 1_000_000_000,
    "cpu.system": 700_000_000,
    "balloon.current": 65536,
    "balloon.maximum": 65536,
    "balloon.rss": 81234,
    "vcpu.current": 1,
    "vcpu.maximum": 1,
    "net.count": 1,
    "net.0.name": "vnet3",
    "net.0.rx.bytes": 1200,
    "net.0.rx.pkts": 10,
    "net.0.rx.errs": 0,
    "net.0.rx.drop": 1,
    "net.0.tx.bytes": 900,
    "net.0.tx.pkts": 7,
    "net.0.tx.errs": 0,
    "net.0.tx.drop": 0,
    "block.count": 2,
    "block.0.name": "vda",
    "block.0.rd.reqs": 40,
    "block.0.rd.bytes": 409600,
    "block.0.rd.times": 3_000_000,
    "block.0.wr.reqs": 2,
    "block.0.wr.bytes": 8192,
    "block.0.wr.times": 1_000_000,
    "block.0.fl.reqs": 1,
    "block.1.name": "vdb",
    "block.1.rd.reqs": 0,
    "block.1.rd.bytes": 0,
}
OWNERS = {"team-a_web": VmLabels("team-a", "web", "Running", ("eth0",), ready=True)}


def samples(metrics: list) -> dict[str, float]:  # type: ignore[type-arg]
    out = {}
    for family in metrics:
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def test_a_qemu_domains_statistics_become_labelled_series_in_base_units() -> None:
    got = samples(families([("team-a_web", QEMU_STATS), ("someone-elses", QEMU_STATS)], OWNERS, "node-q"))
    vm = "name=web,namespace=team-a,node=node-q"
    assert got[f"vmm_vm_cpu_seconds_total{{{vm}}}"] == 2.5
    assert got[f"vmm_vm_vcpus{{{vm}}}"] == 1
    assert got[f"vmm_vm_memory_assigned_bytes{{{vm}}}"] == 64 << 20
    assert got[f"vmm_vm_memory_resident_bytes{{{vm}}}"] == 81234 * 1024
    assert got[f"vmm_vm_disk_read_bytes_total{{disk=vda,{vm}}}"] == 409600
    assert got[f"vmm_vm_disk_read_seconds_total{{disk=vda,{vm}}}"] == pytest.approx(0.003)
    assert got[f"vmm_vm_disk_flush_requests_total{{disk=vda,{vm}}}"] == 1
    assert got[f"vmm_vm_disk_read_requests_total{{disk=vdb,{vm}}}"] == 0
    assert f"vmm_vm_disk_write_bytes_total{{disk=vdb,{vm}}}" not in got  # not reported: no series
    # Interfaces carry the spec's names, not the host's tap names.
    assert got[f"vmm_vm_network_receive_bytes_total{{interface=eth0,{vm}}}"] == 1200
    assert got[f"vmm_vm_network_receive_drops_total{{interface=eth0,{vm}}}"] == 1
    assert got[f"vmm_vm_ready{{{vm}}}"] == 1
    assert got[f"vmm_vm_phase{{{vm},phase=Running}}"] == 1
    assert got[f"vmm_vm_phase{{{vm},phase=Stopped}}"] == 0
    assert not [key for key in got if "someone-elses" in key]


def test_a_hung_statistics_call_makes_the_scrape_say_so_not_hang() -> None:
    release = threading.Event()
    calls = []

    def stuck() -> list:  # type: ignore[type-arg]
        calls.append(1)
        release.wait(30)
        return []

    registry = CollectorRegistry()
    registry.register(VmStatsCollector(stuck, lambda: OWNERS, "node-q", timeout=0.2))
    started = time.monotonic()
    text = generate_latest(registry).decode()
    assert 'vmm_vm_stats_up{node="node-q"} 0.0' in text
    text = generate_latest(registry).decode()  # the first call still hangs: no second one
    assert 'vmm_vm_stats_up{node="node-q"} 0.0' in text and len(calls) == 1
    assert time.monotonic() - started < 5
    release.set()


def test_an_answer_in_time_is_up() -> None:
    registry = CollectorRegistry()
    registry.register(VmStatsCollector(lambda: [("team-a_web", QEMU_STATS)], lambda: OWNERS, "node-q"))
    text = generate_latest(registry).decode()
    assert 'vmm_vm_stats_up{node="node-q"} 1.0' in text
    assert 'vmm_vm_cpu_seconds_total{name="web",namespace="team-a",node="node-q"} 2.5' in text
