"""Which cached bases the VM disks of this node stand on (a qcow2 overlay names its backing
file), and the sizes and ages of cached files: what the import's cap check and the garbage
collector both read."""

from pathlib import Path

from formation_vmm.images.formats import qcow2_backing_name


def overlay_bases(disks_dir: Path) -> set[str]:
    """The backing files named by the qcow2 disks under ``disks_dir`` (VM overlays)."""
    found: set[str] = set()
    if not disks_dir.is_dir():
        return found
    for disk in disks_dir.glob("*/*/*/*.qcow2"):  # <namespace>/<vm>/<uid>/<disk>.qcow2
        if disk.is_symlink() or not disk.is_file():
            continue
        with disk.open("rb") as f:
            backing = qcow2_backing_name(f.read(4096))
        if backing:
            found.add(backing)
    return found


def backs(paths: list[Path], bases: set[str]) -> bool:
    """Whether a cached base (its files) is the backing file of a VM disk (``overlay_bases``)."""
    return any(str(p) in bases for p in paths)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def mtime_of(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
