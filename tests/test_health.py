"""What /readyz and /healthz answer, from what the loops report. Pure."""

import threading

import pytest

from formation_vmm.health import Health, within
from tests.support.waiting import wait_for

pytestmark = pytest.mark.pure


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ready_only_once_started_and_every_pulse_beat_recently() -> None:
    clock = Clock()
    health = Health(clock)
    health.pulse("api", 30, "the heartbeat reached the API")
    assert health.not_ready() == ["the operator is starting", "the heartbeat reached the API: not yet"]
    health.started.set()
    health.beat("api")
    assert health.not_ready() == []
    clock.now += 31
    assert health.not_ready() == ["the heartbeat reached the API: not for 31s"]


def test_checks_report_why_and_a_broken_check_says_so() -> None:
    health = Health(Clock())
    health.started.set()
    health.ready_check("libvirt", lambda: "cannot connect to qemu:///system")
    health.live_check("loops", lambda: None)

    def broken() -> str | None:
        raise OSError("boom")

    health.live_check("workers", broken)
    assert health.not_ready() == ["libvirt: cannot connect to qemu:///system"]
    assert health.not_live() == ["workers: check failed: boom"]


def test_a_hanging_check_is_reported_and_never_run_twice_at_once() -> None:
    release = threading.Event()
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def hangs() -> str | None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(30)
        with lock:
            running[0] -= 1
        return None

    check = within(0.05, hangs)
    assert check() == "no answer within 0s"
    for _ in range(5):  # probes while the daemon stays hung: reported, and no call piles up
        assert check().startswith("no answer for")
    release.set()
    wait_for(lambda: check() is None, 5, "the check to answer once the daemon does")
    assert peak[0] == 1
