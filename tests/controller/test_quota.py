"""A namespace's VM quota, as ResourceQuota states it: which VM fits, and what a refused one is
told. Pure; the controlplane tier checks the same against a real apiserver."""

import pytest

from formation_vmm.quota import CPUS, DISK, MEMORY, Quota, Usage, quota_of, refusal

pytestmark = pytest.mark.pure

GI = 1 << 30


def test_a_quota_reads_only_our_resource_names() -> None:
    quota = quota_of("vms", {CPUS: "4", MEMORY: "8Gi", "pods": "10", DISK: "1Ti"})
    assert quota == Quota("vms", cpus=4, memory=8 * GI, disk=1024 * GI)
    assert quota_of("pods-only", {"pods": "10"}) == Quota("pods-only")


def test_a_vm_fits_up_to_the_limit_and_not_past_it() -> None:
    quotas = [quota_of("vms", {CPUS: "4", MEMORY: "8Gi"})]
    assert refusal(quotas, Usage(2, 4 * GI), Usage(2, 4 * GI)) is None
    why = refusal(quotas, Usage(2, 4 * GI), Usage(3, GI))
    assert why == (
        "ResourceQuota vms allows 4 of vCPUs for VMs in this namespace; its VMs use 2 and this one asks for 3"
    )
    why = refusal(quotas, Usage(1, 7 * GI), Usage(1, 2 * GI))
    assert why is not None and "allows 8Gi of memory" in why and "use 7Gi" in why


def test_every_quota_of_the_namespace_holds_and_none_means_no_limit() -> None:
    quotas = [quota_of("team", {CPUS: "16"}), quota_of("disks", {DISK: "100Gi"})]
    assert refusal([], Usage(1000, 1000 * GI, 1000 * GI), Usage(1, GI, GI)) is None
    assert refusal(quotas, Usage(2, 0, 90 * GI), Usage(1, 0, 10 * GI)) is None
    why = refusal(quotas, Usage(2, 0, 90 * GI), Usage(1, 0, 20 * GI))
    assert why is not None and why.startswith("ResourceQuota disks allows 100Gi of disk")


def test_a_disk_refusal_says_snapshots_count_too() -> None:
    why = refusal([quota_of("disks", {DISK: "20Mi"})], Usage(disk=25 << 20), Usage(disk=4 << 20))
    assert why == (
        "ResourceQuota disks allows 20Mi of disk for VMs in this namespace; "
        "its VMs and snapshots use 25Mi and this one asks for 4Mi"
    )
