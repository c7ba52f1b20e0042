"""`kubectl vm top`'s table from two samples of the agents' counters. Pure; the control-plane
tier runs the verb against a real guest's agent."""

import pytest

from formation_vmm.plugin import top_rows

pytestmark = pytest.mark.pure


def counters(cpu: float, rss: int, rd: int, wr: int, rx: int, tx: int) -> dict[str, float]:
    return {
        "cpuSeconds": cpu,
        "memoryResidentBytes": rss,
        "diskReadBytes": rd,
        "diskWriteBytes": wr,
        "networkReceiveBytes": rx,
        "networkTransmitBytes": tx,
    }


def test_rates_over_the_interval_and_memory_now() -> None:
    before = {"web": counters(10.0, 100 << 20, 0, 0, 0, 0), "gone": counters(1, 1, 1, 1, 1, 1)}
    after = {"web": counters(11.0, 120 << 20, 4 << 20, 1024, 2048, 0), "new": counters(1, 1, 1, 1, 1, 1)}
    rows = top_rows(before, after, 2.0)
    assert rows[0] == ["NAME", "CPU", "MEMORY", "DISK-READ", "DISK-WRITE", "NET-RX", "NET-TX"]
    # Only VMs in both samples; CPU as a share of one vCPU.
    assert rows[1:] == [["web", "50.0%", "120.0Mi", "2.0Mi/s", "512/s", "1.0Ki/s", "0/s"]]


def test_a_counter_that_went_back_counts_as_no_change() -> None:
    """A VM restarted between the samples: its counters start again from zero."""
    rows = top_rows({"vm": counters(50, 1, 900, 900, 900, 900)}, {"vm": counters(1, 1, 10, 10, 10, 10)}, 1.0)
    assert rows[1] == ["vm", "0.0%", "1", "0/s", "0/s", "0/s", "0/s"]
