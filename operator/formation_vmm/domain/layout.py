"""Where a VM's files live on the node. Every path is derived from validated names only."""

from dataclasses import dataclass
from pathlib import Path

from formation_vmm.domain.naming import UnsafeNameError, require_label, require_object_name


@dataclass(frozen=True)
class NodeLayout:
    vm_dir: Path  # runtime files: console logs, cloud-init seeds (VMM_VM_DIR)
    disks_dir: Path  # persistent VM disks (VMM_DISKS_DIR)
    images_dir: Path  # cached images (VMM_IMAGES_DIR)

    def runtime_dir(self, namespace: str, name: str) -> Path:
        return self.vm_dir / require_label(namespace, "namespace") / require_object_name(name, "VM name")

    def disk_dir(self, namespace: str, name: str) -> Path:
        return self.disks_dir / require_label(namespace, "namespace") / require_object_name(name, "VM name")

    def disk_path(self, namespace: str, name: str, disk: str) -> Path:
        return self.disk_dir(namespace, name) / f"{require_label(disk, 'disk name')}.qcow2"

    def console_log(self, namespace: str, name: str) -> Path:
        return self.runtime_dir(namespace, name) / "console.log"

    def seed_path(self, namespace: str, name: str) -> Path:
        return self.runtime_dir(namespace, name) / "cloud-init.iso"

    def image_path(self, relative: str) -> Path:
        """A hostPath image, relative to the images directory. Refuses absolute paths and '..'
        (the CRD refuses them too); symlinks are checked when the file is used."""
        parts = Path(relative).parts
        if not relative or Path(relative).is_absolute() or ".." in parts:
            raise UnsafeNameError(f"image path {relative!r} must be relative, inside the images directory")
        return self.images_dir / relative
