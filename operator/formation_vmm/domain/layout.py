"""Where a VM's files live on the node. Every path is derived from validated names only, and
includes the VM's uid: a VM deleted and created again under the same name never meets the old
one's disks, seed or console log."""

from dataclasses import dataclass
from pathlib import Path

from formation_vmm.domain.naming import UnsafeNameError, require_label, require_object_name
from formation_vmm.domain.spec import Owner


@dataclass(frozen=True)
class NodeLayout:
    vm_dir: Path  # runtime files: console logs, cloud-init seeds (VMM_VM_DIR)
    disks_dir: Path  # persistent VM disks (VMM_DISKS_DIR)
    images_dir: Path  # hostPath image sources (VMM_IMAGES_DIR)
    cache_dir: Path  # verified image bases (VMM_IMAGE_CACHE_DIR), never under images_dir

    def qemu_reaches(self) -> tuple[Path, ...]:
        """The directories a VM's QEMU opens files under (not images_dir: bases come from the
        cache)."""
        return (self.disks_dir, self.vm_dir, self.cache_dir)

    @staticmethod
    def _relative(owner: Owner) -> Path:
        return (
            Path(require_label(owner.namespace, "namespace"))
            / require_object_name(owner.name, "VM name")
            / require_label(owner.uid, "VM uid")
        )

    def runtime_dir(self, owner: Owner) -> Path:
        return self.vm_dir / self._relative(owner)

    def disk_dir(self, owner: Owner) -> Path:
        return self.disks_dir / self._relative(owner)

    def disk_path(self, owner: Owner, disk: str) -> Path:
        return self.disk_dir(owner) / f"{require_label(disk, 'disk name')}.qcow2"

    def nvram_path(self, owner: Owner) -> Path:
        """A UEFI VM's variables: kept with its disks, removed with them."""
        return self.disk_dir(owner) / "nvram.fd"

    def nvram_snapshot_path(self, owner: Owner, snapshot: str) -> Path:
        """The UEFI variables as they were when ``snapshot`` was taken (a raw file has no
        internal snapshots, so a snapshot keeps a copy beside the disks)."""
        return self.disk_dir(owner) / f"nvram-{require_label(snapshot, 'snapshot name')}.fd"

    def console_log(self, owner: Owner) -> Path:
        return self.runtime_dir(owner) / "console.log"

    def seed_path(self, owner: Owner) -> Path:
        return self.runtime_dir(owner) / "cloud-init.iso"

    def image_path(self, relative: str) -> Path:
        """A hostPath image, relative to the images directory. Refuses absolute paths, '..' and
        any component starting with '.' (the CRD refuses them too); symlinks are checked when
        the file is used."""
        parts = Path(relative).parts
        if not relative or Path(relative).is_absolute() or any(p.startswith(".") for p in parts):
            raise UnsafeNameError(
                f"image path {relative!r} must be relative, inside the images directory, "
                "with no component starting with '.'"
            )
        return self.images_dir / relative
