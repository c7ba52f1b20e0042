"""Issue 26, finding 11: snapshots must not grow a namespace past its disk quota. A snapshot keeps
the blocks its VM's overlays held when it was taken, however the disk changes after; its bytes
(``status.size``) count as disk in the namespace's quota, so a tenant who writes, snapshots,
writes again and snapshots again cannot fill a node while its VMs' declared disks stay small.
Real controller, real agent, real qcow2 snapshots (taken with qemu-img on the test driver's
disks, written with qemu-io), real ResourceQuota."""

import subprocess

import pytest

from tests.controlplane.test_snapshots import apply, apply_vm_with_disk, disk, wait_phase
from tests.support.fleet import TINY, Fleet, condition

pytestmark = pytest.mark.controlplane

MI = 1 << 20


def test_snapshot_bytes_count_against_the_disk_quota(fleet: Fleet, ns: str) -> None:
    # 16Mi for the VM's declared disk and 4Mi more: room for a second VM with a 4Mi disk, if
    # snapshots counted nothing.
    fleet.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "disks", "namespace": ns},
            "spec": {"hard": {"vmm.formation.cloud/disk": "20Mi"}},
        }
    )
    apply_vm_with_disk(fleet, ns, "db")
    fleet.wait_phase(ns, "db", "Running")
    data = disk(fleet, ns, "db")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 8M", str(data)], check=True, capture_output=True
    )
    apply(fleet, "VmSnapshot", ns, "full", {"vmName": "db"})
    size = wait_phase(fleet, "vmsnap", ns, "full", "Ready")["status"]["size"]
    assert size > 8 * MI  # what the overlay held: the 8M written and its metadata

    fleet.apply_vm(ns, "second", nodeSelector={"zone": "a"}, disks=[{"name": "d", "size": "4Mi"}], **TINY)
    vm = fleet.wait_vm(
        ns, "second", lambda v: condition(v, "Scheduled").get("reason") == "QuotaExceeded", "QuotaExceeded"
    )
    message = condition(vm, "Scheduled")["message"]
    assert message.startswith("ResourceQuota disks allows 20Mi of disk"), message
    assert "its VMs and snapshots use" in message and "this one asks for 4Mi" in message

    # The snapshot deleted, its bytes are free again: the second VM is placed.
    fleet.kubectl("delete", "vmsnap", "full", "-n", ns, "--wait=true", "--timeout=30s")
    fleet.wait_phase(ns, "second", "Running", 30)
