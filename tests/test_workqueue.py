"""The agent's work queue: each key once, never two workers on one key, keys for later, a lane
per kind, back-off on failure, metrics per kind. Pure (threads and a clock, no I/O)."""

import threading

import pytest
from prometheus_client import REGISTRY

from formation_vmm.workqueue import WorkQueue

pytestmark = pytest.mark.pure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_queued_many_times_is_taken_once() -> None:
    queue = WorkQueue()
    vms = queue.lane("VM")
    for key in ("a", "b", "a", "a"):
        vms.add(key)
    assert len(vms) == 2
    assert [queue.get("VM"), queue.get("VM")] == ["a", "b"]


def test_a_key_queued_while_it_is_processed_runs_again_afterwards_not_meanwhile() -> None:
    queue = WorkQueue()
    queue.add("VM", "a")
    assert queue.get("VM") == "a"
    queue.add("VM", "a")  # changed again while a worker has it
    assert queue.depth("VM") == 0  # not handed to a second worker
    queue.done("VM", "a")
    assert queue.get("VM") == "a"


def test_keys_for_later_come_when_due() -> None:
    clock = Clock()
    queue = WorkQueue(clock)
    vms = queue.lane("VM")
    vms.add_after("late", 30)
    vms.add_after("soon", 5)
    vms.add_after("now", 0)
    assert queue.get("VM") == "now"
    clock.now += 6
    assert queue.get("VM") == "soon"
    clock.now += 30
    assert queue.get("VM") == "late"


def test_a_key_asked_for_later_again_and_again_waits_once_for_the_earliest_moment() -> None:
    """Every sync of a waiting VM asks for a retry; syncs for other reasons (watch events, the
    periodic resync) must not add retries that then each run the VM again."""
    clock = Clock()
    queue = WorkQueue(clock)
    vms = queue.lane("VM")
    for delay in (10, 10, 20, 5, 10):
        vms.add_after("vm", delay)
    assert vms.waiting() == 1
    clock.now += 5
    assert queue.get("VM") == "vm"
    queue.done("VM", "vm")
    clock.now += 100  # long past every moment asked for above: nothing else comes
    vms.add("other")
    assert queue.get("VM") == "other"
    assert len(vms) == 0 and vms.waiting() == 0


def test_a_waiting_worker_wakes_when_a_key_is_queued() -> None:
    queue = WorkQueue()
    got: list[str | None] = []
    taker = threading.Thread(target=lambda: got.append(queue.get("VM")))
    taker.start()
    queue.add("VM", "poke")
    taker.join(5)
    assert got == ["poke"]


def test_workers_serve_keys_and_survive_a_failing_handler() -> None:
    queue = WorkQueue(first_backoff=30)
    seen: list[str] = []
    done = threading.Event()

    def handler(key: str) -> None:
        seen.append(key)
        if key == "boom":
            raise RuntimeError("a sync failed")
        if key == "last":
            done.set()

    queue.start("VM", handler, workers=1)
    for key in ("boom", "ok", "last"):
        queue.add("VM", key)
    assert done.wait(5)
    assert seen == ["boom", "ok", "last"] and queue.alive()
    assert queue.waiting("VM") == 1  # "boom", retried after its back-off
    queue.close()
    assert queue.get("VM") is None


def test_a_failing_key_waits_a_back_off_that_doubles_and_resets_once_it_succeeds() -> None:
    clock = Clock()
    queue = WorkQueue(clock, first_backoff=1, max_backoff=4)
    retried = _sample("vmm_agent_queue_retries_total", kind="Flaky", cause="failed")
    waits = []
    queue.add("Flaky", "a")
    for _ in range(4):  # it fails each time it is taken
        assert queue.get("Flaky") == "a"
        queue.done("Flaky", "a", failed=True)
        before = clock.now
        while queue.depth("Flaky") == 0:
            clock.now += 0.5
            _promote(queue)
        waits.append(clock.now - before)
    assert waits == [1, 2, 4, 4]  # doubled, up to the most
    assert _sample("vmm_agent_queue_retries_total", kind="Flaky", cause="failed") == retried + 4
    assert queue.get("Flaky") == "a"
    queue.done("Flaky", "a")  # it succeeds
    queue.add("Flaky", "a")
    assert queue.get("Flaky") == "a"
    queue.done("Flaky", "a", failed=True)  # after a success: the first back-off again
    assert queue.waiting("Flaky") == 1
    clock.now += 1
    _promote(queue)
    assert queue.depth("Flaky") == 1


def test_the_work_asks_when_to_look_again() -> None:
    clock = Clock()
    queue = WorkQueue(clock)
    asked = _sample("vmm_agent_queue_retries_total", kind="Waits", cause="asked")
    queue.add("Waits", "a")
    assert queue.get("Waits") == "a"
    queue.done("Waits", "a", again=7)
    assert queue.waiting("Waits") == 1 and queue.depth("Waits") == 0
    clock.now += 7
    assert queue.get("Waits") == "a"
    assert _sample("vmm_agent_queue_retries_total", kind="Waits", cause="asked") == asked + 1


def test_a_lane_busy_for_long_holds_no_other_lane_back() -> None:
    """A migration's copy holds its worker for minutes: the VMs' keys are served meanwhile."""
    queue = WorkQueue()
    copying, release, served = threading.Event(), threading.Event(), threading.Event()

    def copy(key: str) -> None:
        copying.set()
        release.wait(10)

    queue.start("Migration", copy, workers=1)
    queue.start("VM", lambda key: served.set(), workers=1)
    queue.add("Migration", "m")
    assert copying.wait(5)
    queue.add("Migration", "n")  # waits for the one worker of its lane
    queue.add("VM", "vm")
    try:
        assert served.wait(5)
        assert queue.depth("Migration") == 1
    finally:
        release.set()
        queue.close()


def test_depth_and_wait_are_measured_per_kind() -> None:
    clock = Clock()
    queue = WorkQueue(clock)
    waited = _sample("vmm_agent_queue_wait_seconds_sum", kind="Measured")
    queue.add("Measured", "a")
    queue.add("Measured", "b")
    queue.add("Other", "c")
    assert _sample("vmm_agent_queue_depth", kind="Measured") == 2
    clock.now += 3
    assert queue.get("Measured") == "a"
    assert _sample("vmm_agent_queue_depth", kind="Measured") == 1
    assert _sample("vmm_agent_queue_depth", kind="Other") == 1
    assert _sample("vmm_agent_queue_wait_seconds_sum", kind="Measured") == waited + 3


def _promote(queue: WorkQueue) -> None:
    """Due keys move to their lanes when a worker looks for work: look once, in a lane of its
    own given a key so the look returns at once."""
    queue.add("Probe", "p")
    assert queue.get("Probe") == "p"
    queue.done("Probe", "p")


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
