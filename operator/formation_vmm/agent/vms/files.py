"""A VM's files on the node: runtime directory, blank disks and overlays. Every path comes from
``domain.layout`` (validated names) and stays inside its base directory; disks are written under a
temporary name and renamed, so a crash never leaves a half-made disk under the real name."""

import os
import shutil
from pathlib import Path

from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.spec import BaseImage, DomainSpec, Owner
from formation_vmm.host import qemu_img
from formation_vmm.host.paths import make_dir, open_new


def _create(base: Path, path: Path, args: list[str]) -> None:
    make_dir(base, path.parent)
    if path.exists():
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    qemu_img.run("create", "-q", "-f", "qcow2", *args[:-1], str(tmp), *args[-1:])
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def create_blank_disk(base: Path, path: Path, size: int) -> None:
    """A sparse qcow2 disk of ``size`` bytes, unless it exists."""
    _create(base, path, [str(size)])


def create_overlay(base_dir: Path, path: Path, base: BaseImage, size: int | None) -> None:
    """A qcow2 overlay on a cached base, so the base is never written and many VMs share it;
    made in milliseconds whatever the base's size."""
    wanted = max(size or 0, base.virtual_size)
    _create(base_dir, path, ["-F", base.format, "-b", str(base.path), str(wanted)])


def virtual_size(path: Path) -> int:
    """The size the guest sees."""
    return qemu_img.info(path, "qcow2").virtual_size


def resize_offline(path: Path, size: int) -> None:
    qemu_img.run("resize", "-q", "-f", "qcow2", str(path), str(size))


# The VM's own files, handed to its QEMU's uid: disks, UEFI variables (and their snapshots'
# copies), the cloud-init seed. The console log stays virtlogd's, a restore's marker the agent's.
_QEMU_FILES = (".qcow2", ".fd", ".iso")


def hand_over(directories: list[Path], owner: tuple[int, int] | None) -> None:
    """The VM's files in ``directories`` to ``owner`` (its QEMU's, qemu_uids.py), 0600: its QEMU
    reads and writes them, no other VM's can. The directories stay root's (0711), so nothing but
    the agent makes a name in them, and no symlink is followed."""
    if owner is None:
        return
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            if path.suffix in _QEMU_FILES and path.is_file() and not path.is_symlink():
                os.chown(path, *owner, follow_symlinks=False)
                os.chmod(path, 0o600)


def _nvram_from_template(nvram: Path, template: Path) -> None:
    """The VM's UEFI variables made from the template, as libvirt would at first start; made
    here so they can be handed to the VM's QEMU uid before it starts."""
    if nvram.exists():
        return
    tmp = nvram.with_name(f".{nvram.name}.tmp")
    with os.fdopen(open_new(tmp, 0o600), "wb") as out, template.open("rb") as source:
        shutil.copyfileobj(source, out)
    os.replace(tmp, nvram)


def prepare(
    spec: DomainSpec,
    sizes: dict[str, int],
    runtime_base: Path,
    disks_base: Path,
    bases: dict[str, BaseImage],
) -> None:
    """Create what the domain refers to: its runtime directory, its overlays and blank disks,
    and the directory of its NVRAM (libvirt makes the file itself, from the template, unless
    the VM's QEMU runs as its own uid: then it is made here, to be handed over)."""
    make_dir(runtime_base, spec.console_log.parent)
    firmware = spec.firmware
    if firmware is not None and firmware.nvram is not None:
        make_dir(disks_base, firmware.nvram.parent)
        if spec.qemu_uid is not None and firmware.nvram_template is not None:
            _nvram_from_template(firmware.nvram, firmware.nvram_template)
    for disk in spec.disks:
        size = sizes.get(disk.name)
        if disk.name in bases:
            create_overlay(disks_base, disk.path, bases[disk.name], size)
        elif size is not None:
            create_blank_disk(disks_base, disk.path, size)


def restore_marker(layout: NodeLayout, owner: Owner) -> Path:
    """Beside a VM's disks while a restore of them is under way (see ``snapshots``)."""
    return layout.disk_dir(owner) / "restore.json"


def restore_held(layout: NodeLayout, owner: Owner) -> bool:
    """A restore of this VM is under way (or was cut short by a crash): do not start it."""
    return restore_marker(layout, owner).exists()
