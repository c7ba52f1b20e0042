"""How a snapshot is taken, and how its data is removed, given the VM's state. Pure."""

from enum import Enum


class SnapshotMode(Enum):
    MEMORY = "memory"  # libvirt internal snapshot of a running domain: disks and memory
    LIVE_DISKS = "live-disks"  # QEMU's internal snapshots of a running domain's disks, one transaction
    OFFLINE = "offline"  # qemu-img on the disk files: the domain is stopped (or runs nothing)


def snapshot_mode(running: bool, include_memory: bool, runs_qemu: bool) -> SnapshotMode:
    """``running``: the domain runs or is paused. Memory is only saved from a running domain (a
    stopped one has none); a running QEMU holds its disks open, so they are snapshot through it;
    libvirt's test driver runs no QEMU, so its disk files are snapshot directly."""
    if running and include_memory:
        return SnapshotMode.MEMORY
    if running and runs_qemu:
        return SnapshotMode.LIVE_DISKS
    return SnapshotMode.OFFLINE


def removal_mode(with_memory: bool, active: bool, runs_qemu: bool) -> SnapshotMode:
    """How a snapshot's data leaves the disks: a memory snapshot through libvirt (which holds
    its metadata), disk snapshots through QEMU while it holds them open, else with qemu-img."""
    if with_memory:
        return SnapshotMode.MEMORY
    if active and runs_qemu:
        return SnapshotMode.LIVE_DISKS
    return SnapshotMode.OFFLINE
