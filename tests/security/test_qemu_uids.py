"""Issue 26, finding 10: one uid per VM's QEMU. A guest that escapes its QEMU holds that QEMU's
uid: its own disks, nothing of another VM's, and no shared base to write. Two real QEMU guests
on node-q (whose libvirtd would run every QEMU as root): each runs as the uid the controller
recorded for it, its disk is that uid's alone, and that uid can read its own disk and neither
the other's nor write the kernel both boot from (tried as that uid, with setpriv)."""

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from formation_vmm.api.names import QEMU_UID_ANNOTATION
from formation_vmm.qemu_uids import BASE, SPAN
from tests.controlplane.test_real_network import guest_files, images  # noqa: F401
from tests.support.fleet import ON_QEMU, QEMU_NODE, Fleet

pytestmark = pytest.mark.controlplane

KVM_GID = Path("/dev/kvm").stat().st_gid


def as_uid(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={KVM_GID}", "--clear-groups", *argv],
        capture_output=True,
        text=True,
        errors="replace",  # a disk's bytes on stdout
        check=False,
    )


def process_uids(pid: int) -> set[int]:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("Uid:"))
    return {int(v) for v in line.split()[1:]}


def test_each_vms_qemu_runs_as_its_own_uid_and_touches_only_its_own_files(
    fleet: Fleet,
    ns: str,
    guest_files: dict[str, str],  # noqa: F811
) -> None:
    images(fleet, ns, guest_files)
    for name in ("alpha", "beta"):
        fleet.apply_vm(
            ns,
            name,
            **{
                **ON_QEMU,
                "memory": "96Mi",
                "kernel": {"image": "kernel", "initrd": "initrd", "cmdline": "console=ttyS0 panic=-1"},
                "disks": [{"name": "data", "size": "16Mi"}],
            },
        )
    uids, disks = {}, {}
    for name in ("alpha", "beta"):
        vm = fleet.wait_phase(ns, name, "Running", 120)
        uid = int(vm["metadata"]["annotations"][QEMU_UID_ANNOTATION])
        assert BASE <= uid < BASE + SPAN
        assert process_uids(fleet.qemu_pid(f"{ns}_{name}")) == {uid}  # real, effective, saved, fs
        disk = fleet.vm_disk(QEMU_NODE, ns, name, "data")
        # Its group is the node's /dev/kvm's (so QEMU may use KVM), shared, but 0600 gives it nothing.
        assert (disk.stat().st_uid, disk.stat().st_gid, disk.stat().st_mode & 0o777) == (uid, KVM_GID, 0o600)
        uids[name], disks[name] = uid, disk
    assert uids["alpha"] != uids["beta"]

    own = as_uid(uids["alpha"], "head", "-c", "512", str(disks["alpha"]))
    assert own.returncode == 0, own.stderr  # the path to a VM's own files is open to it...
    other = as_uid(uids["alpha"], "head", "-c", "512", str(disks["beta"]))
    assert other.returncode != 0 and "Permission denied" in other.stderr  # ...and no other's
    # The kernel both boot from: a cached base, shared, read-only to all and never theirs.
    kernel = ET.fromstring(fleet.virsh("dumpxml", f"{ns}_alpha")).findtext("os/kernel") or ""
    assert Path(kernel).stat().st_uid == 0
    written = as_uid(uids["alpha"], "sh", "-c", f"echo x >> '{kernel}'")
    assert written.returncode != 0 and "Permission denied" in written.stderr, kernel
