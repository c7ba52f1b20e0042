"""The uid and gid each VM's QEMU runs as: the controller's record. Pure.

A guest that escapes QEMU holds what its QEMU holds. With one uid for every QEMU of a node, that
is every VM's disks and sockets there; with one per VM, its own files only (issue 26, finding
10). The controller gives a VM its uid when it binds it, recorded in the annotation
``vmm.formation.cloud/qemu-uid`` in the same write, and kept for the VM's life: a migration
takes it to the target, so no two VMs of the cluster hold the same one. It is derived from the
VM's uid (a digest, in a range no node user or user namespace of ours takes); on the rare
collision the next derivation is taken. The agent runs the domain's QEMU as that uid (libvirt's
DAC driver, a static label), in the group that owns the node's /dev/kvm (so QEMU can open it;
libvirt gives a static label no supplementary groups), and hands the VM's own files to it, 0600;
the shared bases stay root's, read-only to all.
"""

import hashlib
from collections.abc import Mapping

from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import QEMU_UID_ANNOTATION

# 2^24 ids from one billion: far above any account or container range of a node (systemd's
# dynamic users and user namespaces stay below 2^31 but start much lower).
BASE = 1_000_000_000
SPAN = 1 << 24


def derived_uid(vm_uid: str, attempt: int = 0) -> int:
    salt = f"/{attempt}" if attempt else ""
    digest = hashlib.sha256(f"{vm_uid}{salt}".encode()).digest()
    return BASE + int.from_bytes(digest[:4], "big") % SPAN


def recorded_uid(annotations: Mapping[str, str]) -> int | None:
    """The annotation read back; None when absent or not one of ours."""
    value = str(annotations.get(QEMU_UID_ANNOTATION) or "")
    if not value.isdigit():
        return None
    uid = int(value)
    return uid if BASE <= uid < BASE + SPAN else None


def qemu_owner(vm: VirtualMachine, gid: int | None = None) -> tuple[int, int] | None:
    """(uid, gid) the VM's QEMU runs as, if the controller recorded a uid: ``gid`` is the
    node's (the group of its /dev/kvm), else the uid's own number."""
    uid = recorded_uid(vm.metadata.annotations)
    return (uid, uid if gid is None else gid) if uid is not None else None


class UidBook:
    """Which VM holds which QEMU uid, cluster-wide (the binder's, under its lock)."""

    def __init__(self) -> None:
        self._holder: dict[int, str] = {}  # QEMU uid -> VM uid
        self._of: dict[str, int] = {}  # VM uid -> QEMU uid

    def record(self, vm_uid: str, uid: int | None) -> None:
        """What a VM's annotation says (a recorded uid another VM holds stays that VM's: the
        later one is given a fresh uid when it is bound)."""
        if uid is None or self._holder.get(uid, vm_uid) != vm_uid:
            return
        self.release(vm_uid)
        self._holder[uid] = vm_uid
        self._of[vm_uid] = uid

    def release(self, vm_uid: str) -> None:
        uid = self._of.pop(vm_uid, None)
        if uid is not None and self._holder.get(uid) == vm_uid:
            del self._holder[uid]

    def assign(self, vm_uid: str) -> int:
        """The VM's uid: the one it holds, else a fresh one no other VM holds."""
        if vm_uid in self._of:
            return self._of[vm_uid]
        attempt = 0
        while (uid := derived_uid(vm_uid, attempt)) in self._holder:
            attempt += 1
        self._holder[uid] = vm_uid
        self._of[vm_uid] = uid
        return uid
