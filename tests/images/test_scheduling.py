"""The import pool's fairness between namespaces. Pure (threads, no I/O)."""

import threading

import pytest

from formation_vmm.images.scheduling import FairPool

pytestmark = pytest.mark.pure


def test_one_namespace_cannot_hold_every_slot() -> None:
    """Two workers, one import per namespace at a time: a tenant with many slow imports holds one
    slot, and another tenant's import runs in the other at once."""
    pool = FairPool(workers=2, per_namespace=1)
    release = threading.Event()
    started: list[str] = []
    other_done = threading.Event()

    def slow(name: str) -> None:
        started.append(name)
        release.wait(10)

    for index in range(5):
        pool.submit("greedy", lambda i=index: slow(f"greedy-{i}"))  # type: ignore[misc]
    pool.submit("modest", other_done.set)
    assert other_done.wait(5), "the other namespace's import waited behind the greedy one's"
    assert started == ["greedy-0"]  # the greedy namespace never had two running
    release.set()
    pool.close()


def test_waiting_namespaces_take_turns() -> None:
    pool = FairPool(workers=1, per_namespace=1)
    gate = threading.Event()
    order: list[str] = []
    done = threading.Event()
    pool.submit("a", lambda: gate.wait(5))  # holds the only worker while the queue fills
    for job in ("a1", "a2", "b1", "b2", "c1"):
        pool.submit(job[0], lambda job=job: order.append(job))  # type: ignore[misc]
    pool.submit("c", done.set)
    gate.set()
    assert done.wait(5)
    # Round robin: the first three come from three namespaces, then the two left over.
    assert {job[0] for job in order[:3]} == {"a", "b", "c"}
    assert sorted(order[3:]) == ["a2", "b2"]
    pool.close()
