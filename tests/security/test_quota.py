"""A namespace's VM quota, stated in a real ResourceQuota and honoured by the real controller: a
VM past it stays Pending with reason QuotaExceeded and a message naming the quota, another
namespace is not touched, and the VM runs once room is made."""

import pytest

from tests.support.fleet import TINY, Fleet, condition

pytestmark = pytest.mark.controlplane


def quota(fleet: Fleet, namespace: str, **hard: str) -> None:
    fleet.apply(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "vms", "namespace": namespace},
            "spec": {"hard": {f"vmm.formation.cloud/{k}": v for k, v in hard.items()}},
        }
    )


def test_a_vm_past_its_namespaces_quota_waits_until_room_is_made(fleet: Fleet, ns: str) -> None:
    quota(fleet, ns, cpus="2", memory="1Gi")
    fleet.apply_vm(ns, "first", cpus=2, memory="64Mi")
    fleet.wait_phase(ns, "first", "Running")
    fleet.apply_vm(ns, "second", **TINY)
    vm = fleet.wait_vm(
        ns, "second", lambda v: condition(v, "Scheduled").get("reason") == "QuotaExceeded", "QuotaExceeded"
    )
    assert vm["status"]["phase"] == "Pending" and "nodeName" not in vm["status"]
    assert condition(vm, "Scheduled")["message"] == (
        "ResourceQuota vms allows 2 of vCPUs for VMs in this namespace; its VMs use 2 and this one asks for 1"
    )
    fleet.kubectl("delete", "vm", "first", "-n", ns)
    vm = fleet.wait_phase(ns, "second", "Running", 30)
    assert condition(vm, "Scheduled")["status"] == "True"


def test_disks_count_against_the_quota_and_other_namespaces_are_not_touched(fleet: Fleet, ns: str) -> None:
    other = f"{ns}-other"
    fleet.kubectl("create", "namespace", other)
    quota(fleet, ns, disk="1Gi")
    fleet.apply_vm(ns, "big-disk", disks=[{"name": "data", "size": "2Gi"}], **TINY)
    vm = fleet.wait_vm(
        ns, "big-disk", lambda v: condition(v, "Scheduled").get("reason") == "QuotaExceeded", "QuotaExceeded"
    )
    assert "allows 1Gi of disk" in condition(vm, "Scheduled")["message"]
    try:
        fleet.apply_vm(other, "big-disk", disks=[{"name": "data", "size": "2Gi"}], **TINY)
        fleet.wait_phase(other, "big-disk", "Running")
    finally:
        fleet.kubectl("delete", "vm", "--all", "-n", other, "--wait=true", "--timeout=60s")
        fleet.kubectl("delete", "namespace", other, "--wait=false")
