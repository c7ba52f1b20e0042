"""The agent's smaller decisions, as tables: how disks grow, how snapshots are taken and
removed. Pure."""

import pytest

from formation_vmm.agent.snapshots.snapshot_mode import SnapshotMode, removal_mode, snapshot_mode
from formation_vmm.agent.vms.disks import Growth, disk_growth

pytestmark = pytest.mark.pure

GIB = 1 << 30


@pytest.mark.parametrize(
    ("wanted", "current", "active", "runs_qemu", "expected"),
    [
        ({"root": 2 * GIB}, {"root": GIB}, True, True, [Growth("root", 2 * GIB, live=True)]),
        ({"root": 2 * GIB}, {"root": GIB}, False, True, [Growth("root", 2 * GIB, live=False)]),
        # libvirt's test driver holds no file open: grown on disk even while "running".
        ({"root": 2 * GIB}, {"root": GIB}, True, False, [Growth("root", 2 * GIB, live=False)]),
        ({"root": GIB}, {"root": GIB}, True, True, []),
        ({"root": GIB}, {"root": 2 * GIB}, True, True, []),  # never shrunk (the CRD refuses it)
        ({"new": GIB}, {}, True, True, []),  # not made yet: created at its size, not grown
        (
            {"a": 3 * GIB, "b": GIB},
            {"a": GIB, "b": GIB},
            False,
            True,
            [Growth("a", 3 * GIB, live=False)],
        ),
    ],
)
def test_disk_growth(
    wanted: dict[str, int], current: dict[str, int], active: bool, runs_qemu: bool, expected: list[Growth]
) -> None:
    assert disk_growth(wanted, current, active, runs_qemu) == expected


@pytest.mark.parametrize(
    ("running", "include_memory", "runs_qemu", "mode"),
    [
        (True, True, True, SnapshotMode.MEMORY),
        (True, True, False, SnapshotMode.MEMORY),
        (True, False, True, SnapshotMode.LIVE_DISKS),
        (True, False, False, SnapshotMode.OFFLINE),
        (False, True, True, SnapshotMode.OFFLINE),  # a stopped VM has no memory to save
        (False, False, True, SnapshotMode.OFFLINE),
    ],
)
def test_snapshot_mode(running: bool, include_memory: bool, runs_qemu: bool, mode: SnapshotMode) -> None:
    assert snapshot_mode(running, include_memory, runs_qemu) is mode


@pytest.mark.parametrize(
    ("with_memory", "active", "runs_qemu", "mode"),
    [
        (True, False, True, SnapshotMode.MEMORY),
        (False, True, True, SnapshotMode.LIVE_DISKS),
        (False, True, False, SnapshotMode.OFFLINE),
        (False, False, True, SnapshotMode.OFFLINE),
    ],
)
def test_removal_mode(with_memory: bool, active: bool, runs_qemu: bool, mode: SnapshotMode) -> None:
    assert removal_mode(with_memory, active, runs_qemu) is mode
