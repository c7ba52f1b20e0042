"""A VM's files on the node: runtime directory, blank disks. No symlink is followed out of the
configured directories, and qemu-img runs without a shell."""

import os
import shutil
import subprocess
from pathlib import Path

from formation_vmm.api.quantity import parse_quantity
from formation_vmm.domain.spec import BaseImage, DomainSpec
from formation_vmm.images.formats import parse_qemu_info


class UnsafePathError(RuntimeError):
    """A path that would leave its base directory (through '..' or a symlink)."""


def ensure_inside(base: Path, path: Path) -> Path:
    """Return ``path`` if, with every symlink resolved, it stays inside ``base``."""
    real_base = base.resolve()
    real = path.resolve()
    if real != real_base and real_base not in real.parents:
        raise UnsafePathError(f"{path} resolves to {real}, outside {real_base}")
    return path


def qemu_img() -> str:
    """Absolute path of qemu-img, so no later change of PATH or cwd picks another binary."""
    found = shutil.which("qemu-img")
    if found is None:
        raise FileNotFoundError("qemu-img is not installed (Debian package qemu-utils)")
    return found


class QemuImgError(OSError):
    """qemu-img refused; an OSError so a VM's sync reports it as a host error, not a crash."""


QEMU_IMG_TIMEOUT = 3600.0  # a conversion of a large image; a hung qemu-img must not hang a thread


def run_qemu_img(*args: str, ok_codes: tuple[int, ...] = (0,)) -> str:
    """qemu-img with a fixed argv and no shell; its stdout, or QemuImgError with its stderr."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, validated paths, no shell
            [qemu_img(), *args], check=False, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT
        )
    except subprocess.TimeoutExpired as exc:
        raise QemuImgError(f"qemu-img {args[0]} took longer than {QEMU_IMG_TIMEOUT:.0f}s") from exc
    if done.returncode not in ok_codes:
        raise QemuImgError(f"qemu-img {args[0]} failed: {done.stderr.strip()[:300]}")
    return done.stdout


def make_dir(base: Path, path: Path) -> None:
    base.mkdir(parents=True, exist_ok=True)
    ensure_inside(base, path)
    path.mkdir(parents=True, exist_ok=True)
    ensure_inside(base, path)  # again: a component may have been a symlink created meanwhile


def create_blank_disk(base: Path, path: Path, size: str) -> None:
    """Create a sparse qcow2 disk of ``size`` unless it exists. Written under a temporary name and
    renamed, so a crash never leaves a half-made disk under the real name."""
    make_dir(base, path.parent)
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    run_qemu_img("create", "-q", "-f", "qcow2", str(tmp), str(parse_quantity(size)))
    os.replace(tmp, path)


def create_overlay(base_dir: Path, path: Path, base: BaseImage, size: str | None) -> None:
    """A qcow2 overlay on a cached base, so the base is never written and many VMs share it.
    Made in milliseconds whatever the base's size. Same temporary-name-then-rename as above."""
    make_dir(base_dir, path.parent)
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    args = ["create", "-q", "-f", "qcow2", "-F", base.format, "-b", str(base.path), str(tmp)]
    if size is not None:
        args.append(str(max(parse_quantity(size), base.virtual_size)))
    run_qemu_img(*args)
    os.replace(tmp, path)


def virtual_size(path: Path) -> int:
    """The size the guest sees; -U reads it even while QEMU holds the image."""
    return parse_qemu_info(run_qemu_img("info", "-U", "--output=json", str(path))).virtual_size


def resize_offline(path: Path, size: int) -> None:
    run_qemu_img("resize", "-q", "-f", "qcow2", str(path), str(size))


def prepare(
    spec: DomainSpec,
    sizes: dict[str, str],
    runtime_base: Path,
    disks_base: Path,
    bases: dict[str, BaseImage] | None = None,
) -> None:
    """Create what the domain refers to: its runtime directory, its overlays and blank disks."""
    make_dir(runtime_base, spec.console_log.parent)
    bases = bases or {}
    for disk in spec.disks:
        size = sizes.get(disk.name)
        if disk.name in bases:
            create_overlay(disks_base, disk.path, bases[disk.name], size)
        elif size is not None:
            create_blank_disk(disks_base, disk.path, size)


def remove_tree(base: Path, path: Path) -> None:
    """Remove a VM's directory; a symlink in its place is removed, never followed."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    ensure_inside(base, path)
    shutil.rmtree(path)
