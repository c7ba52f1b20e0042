"""The pure rules of live migration: which VM may move, when one waits for a slot, and when a
copy is overdue."""

from typing import Any

import pytest

from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import NODE_LABEL
from formation_vmm.migration_rules import (
    Limits,
    ProgressWatch,
    Slot,
    cannot_move,
    completion_timeout,
    eviction,
    progress_summary,
    restart_after_node_loss,
    schedule,
    slot_wait,
)

pytestmark = pytest.mark.pure


def vm(phase: str = "Running", bound: bool = True, **spec: Any) -> VirtualMachine:
    labels = {NODE_LABEL: "n1"} if bound else {}
    return VirtualMachine.model_validate(
        {"metadata": {"name": "web", "labels": labels}, "spec": spec, "status": {"phase": phase}}
    )


@pytest.mark.parametrize(
    ("machine", "snapshots", "reason"),
    [
        (vm(), 0, None),
        (vm(bound=False), 0, "NotScheduled"),
        (vm("Stopped"), 0, "NotRunning"),
        (vm("Paused", paused=True), 0, "Paused"),
        (vm(networks=[{"name": "eth0", "bridge": "br0"}]), 0, "HostBridge"),
        (vm(firmware={"type": "efi"}), 0, "UefiNvram"),
        (vm(), 2, "HasSnapshots"),
    ],
)
def test_which_vm_may_move(machine: VirtualMachine, snapshots: int, reason: str | None) -> None:
    refusal = cannot_move(machine, snapshots)
    assert (refusal.reason if refusal else None) == reason
    if refusal is not None:
        assert "web" in refusal.message


def test_slots_per_cluster_and_per_node() -> None:
    limits = Limits(in_cluster=3, per_node=2)
    a, b = Slot("a", "t1", False), Slot("b", "t1", False)
    assert slot_wait(a, [], limits) is None
    assert slot_wait(a, [a], limits) is None
    assert "leave node a" in (slot_wait(a, [a, a], limits) or "")
    assert slot_wait(b, [a, a], limits) is None
    assert "in the cluster" in (slot_wait(Slot("c", "t2", False), [a, a, b], limits) or "")


def test_one_namespace_cannot_hold_every_slot() -> None:
    limits = Limits(in_cluster=10, per_node=10, per_namespace=2)
    mine = [Slot("a", "t1", False), Slot("b", "t1", False)]
    assert "namespace t1" in (slot_wait(Slot("c", "t1", False), mine, limits) or "")
    assert slot_wait(Slot("c", "t2", False), mine, limits) is None
    # A drain's migrations are the administrator's: no namespace share holds them back.
    assert slot_wait(Slot("c", "t1", True), mine, limits) is None


def test_drains_go_first() -> None:
    limits = Limits(in_cluster=10, per_node=10, per_namespace=5)
    waiting = slot_wait(Slot("b", "t1", False), [], limits, drains_waiting=1)
    assert "drain" in (waiting or "")
    assert slot_wait(Slot("b", "t1", True), [], limits, drains_waiting=1) is None
    # The cluster's own limit still holds a drain: it waits for a slot like anyone.
    full = [Slot("x", "t2", False)] * 10
    assert "in the cluster" in (slot_wait(Slot("b", "t1", True), full, limits) or "")


def test_a_copy_is_overdue_when_it_stalls_or_runs_past_its_size() -> None:
    limits = Limits(completion_timeout_per_gib=10, progress_timeout=5)
    completion = completion_timeout(limits, 2 << 30, 1 << 30)  # 3 GiB: 30 s
    assert completion == 30
    assert completion_timeout(limits, 256 << 20, 0) == 10  # at least one GiB's worth
    watch = ProgressWatch(started=0, last_progress=0)
    watch.observe(1, 1000)
    watch.observe(4, 900)
    assert watch.overdue(8, limits, completion) is None  # 4 s since it last went down
    watch.observe(8, 950)  # went up (the guest dirtied pages): not progress
    assert "no progress for 5s" in (watch.overdue(9.5, limits, completion) or "")
    steady = ProgressWatch(started=0, last_progress=0)
    for t in range(31):
        steady.observe(t, 10_000 - t)
    assert steady.overdue(30, limits, completion) is None
    assert "did not complete within 30s" in (steady.overdue(31, limits, completion) or "")


def test_the_progress_reads_in_mebibytes() -> None:
    assert progress_summary(120 << 20, 1 << 30, 0) == "120Mi of 1024Mi memory left"
    assert progress_summary(0, 256 << 20, 5 << 20) == "0Mi of 256Mi memory left, 5Mi of disk"


@pytest.mark.parametrize(
    ("strategy", "machine", "migration", "action", "words"),
    [
        (None, vm(), None, "migrate", "moving"),
        ("None", vm(), None, "stay", "evictionStrategy None"),
        ("LiveMigrate", vm(), "Migrating", "wait", "moving (Migrating)"),
        ("LiveMigrate", vm("Paused", paused=True), None, "stay", "blocks the drain: VM web is paused"),
        ("LiveMigrateIfPossible", vm("Paused", paused=True), None, "stay", "set spec.allowDiskLoss"),
        ("LiveMigrateIfPossible", vm("Paused", paused=True, allowDiskLoss=True), None, "restart", "paused"),
        ("LiveMigrateIfPossible", vm("Stopped", allowDiskLoss=True), None, "restart", "is Stopped"),
        ("Restart", vm(), None, "stay", "would lose what its guest wrote"),
        ("Restart", vm(allowDiskLoss=True), None, "restart", "evictionStrategy Restart: stopping it"),
        ("Restart", vm(allowDiskLoss=True), "Migrating", "wait", "moving"),
        ("None", vm(allowDiskLoss=True), None, "stay", "evictionStrategy None"),
    ],
)
def test_what_a_drain_does_with_a_vm(
    strategy: str | None, machine: VirtualMachine, migration: str | None, action: str, words: str
) -> None:
    machine.spec.eviction_strategy = strategy  # type: ignore[assignment]
    decision = eviction(machine, "LiveMigrateIfPossible", 0, migration)
    assert decision.action == action and words in decision.message


def test_a_restart_elsewhere_leaves_no_snapshot_behind() -> None:
    decision = eviction(vm(allowDiskLoss=True), "Restart", 2, None)
    assert decision.action == "stay" and "2 VmSnapshot(s)" in decision.message


@pytest.mark.parametrize(
    ("strategy", "allow", "reason"),
    [
        ("Restart", True, None),
        ("LiveMigrate", True, None),
        (None, True, None),  # the cluster's default, LiveMigrateIfPossible
        ("None", True, "EvictionStrategyNone"),
        ("Restart", False, "DiskLossNotAllowed"),
    ],
)
def test_which_vm_of_a_lost_node_starts_elsewhere(
    strategy: str | None, allow: bool, reason: str | None
) -> None:
    machine = vm("Unknown", allowDiskLoss=allow)
    machine.spec.eviction_strategy = strategy  # type: ignore[assignment]
    refusal = restart_after_node_loss(machine, "LiveMigrateIfPossible")
    assert (refusal.reason if refusal else None) == reason
    if refusal is not None:
        assert refusal.message.endswith("it waits for its node")


def never() -> Any:
    raise AssertionError("asked for what the decision did not need")


@pytest.mark.parametrize(
    ("case", "facts", "expected"),
    [
        ("vm gone", dict(vm=None), ("Failed", "VmNotFound", None, False)),
        ("settling", dict(vm=vm("Migrating")), ("Pending", "VmSettling", None, True)),
        ("older moves it", dict(vm=vm("Migrating"), older="m0"), ("Failed", "AlreadyMigrating", None, False)),
        (
            "cannot move",
            dict(refusal=lambda: cannot_move(vm("Stopped"), 0), older="m0"),  # its own fault first
            ("Failed", "NotRunning", None, True),
        ),
        (
            "named node takes none",
            dict(wanted="n9", wanted_refusal=lambda: "node n9 takes no migrations", older="m0"),
            ("Failed", "BadTarget", None, True),
        ),
        ("older, no fault of its own", dict(older="m0"), ("Failed", "AlreadyMigrating", None, False)),
        ("no slot", dict(wait=lambda: "5 migrations run"), ("Pending", "LimitReached", None, True)),
        (
            "no target",
            dict(target=lambda: (None, "no node has room")),
            ("Scheduling", "NoTarget", None, True),
        ),
        ("starts", dict(wanted="n2", wanted_refusal=lambda: None), ("Preparing", None, "n2", True)),
    ],
)
def test_what_becomes_of_a_migration_asked_for(
    case: str, facts: dict[str, Any], expected: tuple[Any, ...]
) -> None:
    """Each fact is asked for only when the decision gets that far (``never`` fails otherwise)."""
    given: dict[str, Any] = {
        "vm": vm(),
        "older": None,
        "refusal": lambda: None,
        "wanted": None,
        "wanted_refusal": never,
        "wait": lambda: None,
        "target": lambda: ("n2", ""),
    }
    if expected[0] != "Preparing" and expected[1] not in ("NoTarget",):
        given["target"] = never
    if expected[1] in ("VmNotFound", "VmSettling") or (expected[1] == "AlreadyMigrating" and "vm" in facts):
        given["refusal"] = never
    given.update(facts)
    verdict = schedule(vm_name="web", namespace="t", **given)
    assert (verdict.phase, verdict.reason, verdict.target, verdict.note_on_vm) == expected, case
    assert verdict.message, case
