"""The agent's work queue: each key once, never two workers on one key, keys for later. Pure
(threads and a clock, no I/O)."""

import threading

import pytest

from formation_vmm.agent.vms.workqueue import WorkQueue

pytestmark = pytest.mark.pure


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_key_queued_many_times_is_taken_once() -> None:
    queue = WorkQueue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert len(queue) == 2
    assert [queue.get(), queue.get()] == ["a", "b"]


def test_a_key_queued_while_it_is_processed_runs_again_afterwards_not_meanwhile() -> None:
    queue = WorkQueue()
    queue.add("a")
    assert queue.get() == "a"
    queue.add("a")  # changed again while a worker has it
    assert len(queue) == 0  # not handed to a second worker
    queue.done("a")
    assert queue.get() == "a"


def test_keys_for_later_come_when_due() -> None:
    clock = Clock()
    queue = WorkQueue(clock)
    queue.add_after("late", 30)
    queue.add_after("soon", 5)
    queue.add_after("now", 0)
    assert queue.get() == "now"
    clock.now += 6
    assert queue.get() == "soon"
    clock.now += 30
    assert queue.get() == "late"


def test_a_key_asked_for_later_again_and_again_waits_once_for_the_earliest_moment() -> None:
    """Every sync of a waiting VM asks for a retry; syncs for other reasons (watch events, the
    periodic resync) must not add retries that then each run the VM again."""
    clock = Clock()
    queue = WorkQueue(clock)
    for delay in (10, 10, 20, 5, 10):
        queue.add_after("vm", delay)
    assert queue.waiting() == 1
    clock.now += 5
    assert queue.get() == "vm"
    queue.done("vm")
    clock.now += 100  # long past every moment asked for above: nothing else comes
    queue.add("other")
    assert queue.get() == "other"
    assert len(queue) == 0 and queue.waiting() == 0


def test_a_waiting_worker_wakes_when_a_key_is_queued() -> None:
    queue = WorkQueue()
    got: list[str | None] = []
    taker = threading.Thread(target=lambda: got.append(queue.get()))
    taker.start()
    queue.add("poke")
    taker.join(5)
    assert got == ["poke"]


def test_workers_serve_keys_and_survive_a_failing_handler() -> None:
    queue = WorkQueue()
    seen: list[str] = []
    done = threading.Event()

    def handler(key: str) -> None:
        seen.append(key)
        if key == "boom":
            raise RuntimeError("a sync failed")
        if key == "last":
            done.set()

    queue.start(handler, workers=1)
    for key in ("boom", "ok", "last"):
        queue.add(key)
    assert done.wait(5)
    assert seen == ["boom", "ok", "last"] and queue.alive()
    queue.close()
    assert queue.get() is None
