"""Which of a VM's disks grow, and how. Pure."""

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Growth:
    disk: str
    size: int  # bytes
    live: bool  # through the running hypervisor (the guest sees it at once), else qemu-img


def disk_growth(
    wanted: Mapping[str, int], current: Mapping[str, int], active: bool, runs_qemu: bool
) -> list[Growth]:
    """Disks whose spec size is above their size now. A running QEMU holds its images open, so a
    disk of a running domain grows through it; a stopped one (or any on libvirt's test driver,
    whose domains hold no file) with qemu-img. Shrinking is refused by the CRD, never done here."""
    live = active and runs_qemu
    return [
        Growth(name, size, live)
        for name, size in sorted(wanted.items())
        if name in current and size > current[name]
    ]
