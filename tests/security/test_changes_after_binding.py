"""A bound VM's spec meets the checks a new VM meets, every time it changes (issue 26, findings
1 and 6): room on its node, its namespace's quota, the networks its namespace may use, MACs
unique on a network, and an address from IPAM before a new interface exists. A change that
fails is held: the running guest is untouched and a restart does not apply it; the VM's
condition SpecAccepted says why. Against the real apiserver with the policies we ship, tenants'
writes made as a tenant, and the fleet's agents (libvirt's test driver, 4 vCPUs per node)."""

import json
from typing import Any

import pytest

from formation_vmm.api.names import ADDRESSES_ANNOTATION, ADMITTED_ANNOTATION, MACS_ANNOTATION
from formation_vmm.devcluster.cluster import Kubectl
from formation_vmm.macs import decode_macs
from tests.security.test_node_binding import as_, refused
from tests.support.fleet import TINY, Fleet, condition
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

ON_A = {**TINY, "nodeSelector": {"zone": "a"}}


@pytest.fixture
def tenant(fleet: Fleet, ns: str) -> Kubectl:
    """A namespace user holding Kubernetes' edit role there (our kinds through aggregation)."""
    return as_(fleet, fleet.user(ns, "tenant", "edit"))


def patch_spec(kubectl: Kubectl, ns: str, name: str, spec: dict[str, Any]) -> None:
    kubectl("patch", "vm", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def vcpus_on_node(fleet: Fleet, node: str, ns: str, name: str) -> int:
    """What the domain has, as libvirt on the node says (the agent's node-local endpoint)."""
    found = [d for d in fleet.agent_vms(node) if (d["namespace"], d["name"]) == (ns, name)]
    assert len(found) == 1, found
    return int(found[0]["vcpus"])


def wait_accepted(fleet: Fleet, ns: str, name: str, status: str, reason: str) -> dict[str, Any]:
    return fleet.wait_vm(
        ns,
        name,
        lambda vm: (
            (condition(vm, "SpecAccepted").get("status"), condition(vm, "SpecAccepted").get("reason"))
            == (status, reason)
        ),
        f"SpecAccepted {status} {reason}",
    )


def restart(fleet: Fleet, ns: str, name: str, tenant: Kubectl) -> None:
    out = fleet.plugin("-n", ns, "restart", name, kubeconfig=tenant.kubeconfig)
    assert out.returncode == 0, out.stderr


def test_a_bound_vm_grows_only_as_far_as_its_node_has_room(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    fleet.apply_vm(ns, "grower", **ON_A)
    fleet.wait_phase(ns, "grower", "Running")
    admitted = fleet.vm(ns, "grower")["metadata"]["annotations"][ADMITTED_ANNOTATION]
    # Within the cluster's per-VM limits (64 vCPUs, 256Gi), far beyond node-a's 4 vCPUs.
    patch_spec(tenant, ns, "grower", {"cpus": 64, "memory": "256Gi"})
    vm = wait_accepted(fleet, ns, "grower", "False", "InsufficientRoom")
    assert (
        "the change waits, the VM runs as it was admitted: node node-a has"
        in condition(vm, "SpecAccepted")["message"]
    )
    vm = fleet.wait_vm(
        ns, "grower", lambda v: condition(v, "RestartRequired").get("reason") == "ChangeHeld", "held"
    )
    assert (
        vm["status"]["phase"] == "Running" and vm["metadata"]["annotations"][ADMITTED_ANNOTATION] == admitted
    )
    events = fleet.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=grower")
    assert "InsufficientRoom" in events
    # A restart does not apply what was not admitted: the guest comes back as it was.
    restart(fleet, ns, "grower", tenant)
    assert vcpus_on_node(fleet, "node-a", ns, "grower") == 1
    # What fits is admitted, and applied by the next restart.
    patch_spec(tenant, ns, "grower", {"cpus": 2, "memory": "64Mi"})
    vm = wait_accepted(fleet, ns, "grower", "True", "Admitted")
    assert "cpus=2" in vm["metadata"]["annotations"][ADMITTED_ANNOTATION]
    fleet.wait_vm(
        ns, "grower", lambda v: condition(v, "RestartRequired").get("status") == "True", "to need a restart"
    )
    restart(fleet, ns, "grower", tenant)
    assert vcpus_on_node(fleet, "node-a", ns, "grower") == 2


def test_a_bound_vm_grows_only_as_far_as_its_namespace_quota(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    fleet.kubectl.apply_docs(
        [
            {
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "vm-cpus", "namespace": ns},
                "spec": {"hard": {"vmm.formation.cloud/cpus": "2"}},
            }
        ]
    )
    fleet.apply_vm(ns, "one", **ON_A)
    fleet.apply_vm(ns, "two", **ON_A)
    fleet.wait_phase(ns, "one", "Running")
    fleet.wait_phase(ns, "two", "Running")
    patch_spec(tenant, ns, "one", {"cpus": 2})
    vm = wait_accepted(fleet, ns, "one", "False", "QuotaExceeded")
    assert "ResourceQuota vm-cpus allows 2 of vCPUs" in condition(vm, "SpecAccepted")["message"]
    # Room made in the namespace: the held change is admitted without being asked again.
    fleet.kubectl("delete", "vm", "two", "-n", ns, "--wait=true")
    wait_accepted(fleet, ns, "one", "True", "Admitted")


def test_a_bound_vm_joins_only_networks_its_namespace_may_use_with_an_address_first(
    fleet: Fleet, ns: str, tenant: Kubectl, make_network: Any
) -> None:
    key = "vmm-test-team"
    private = make_network("10.124.9.0/24", mode="isolated", namespaceSelector={"matchLabels": {key: ns}})
    fleet.apply_vm(ns, "joiner", networks=[{"name": "eth0"}], **ON_A)
    fleet.wait_phase(ns, "joiner", "Running")
    both = [{"name": "eth0"}, {"name": "eth1", "network": private}]
    # Refused at admission: the policy can know (each VmNetwork is its param).
    proc = tenant.run(
        "patch", "vm", "joiner", "-n", ns, "--type=merge", "-p", json.dumps({"spec": {"networks": both}})
    )
    assert (
        proc.returncode != 0
        and f"VmNetwork {private} may not be used by VMs of namespace {ns}" in proc.stderr
    )
    fleet.kubectl("label", "namespace", ns, f"{key}={ns}")
    patch_spec(tenant, ns, "joiner", {"networks": both})
    vm = fleet.wait_vm(
        ns,
        "joiner",
        lambda v: "eth1=" in v["metadata"]["annotations"].get(ADDRESSES_ANNOTATION, ""),
        "eth1's address",
    )
    # Its address and MAC are recorded before any agent defines the interface.
    assert f"eth1={private}/10.124.9." in vm["metadata"]["annotations"][ADDRESSES_ANNOTATION]
    assert "eth1" in decode_macs(vm["metadata"]["annotations"][MACS_ANNOTATION])
    restart(fleet, ns, "joiner", tenant)
    shown = wait_for(
        lambda: next(
            (i for i in fleet.vm(ns, "joiner")["status"].get("interfaces", []) if i["name"] == "eth1"), None
        ),
        30,
        "eth1 in the status",
    )
    assert shown["ipAddress"].startswith("10.124.9.") and shown["infoSource"].startswith("ipam")


def test_a_mac_is_unique_on_its_network_and_refused_with_its_owners_name(
    fleet: Fleet, ns: str, tenant: Kubectl
) -> None:
    fleet.apply_vm(ns, "first", networks=[{"name": "eth0"}], **ON_A)
    first = fleet.wait_phase(ns, "first", "Running")
    taken = decode_macs(first["metadata"]["annotations"][MACS_ANNOTATION])["eth0"]
    assert taken.startswith("02:")  # 40 bits of a digest, locally administered
    fleet.apply_vm(ns, "thief", networks=[{"name": "eth0", "macAddress": taken.upper()}], **ON_A)
    vm = fleet.wait_vm(
        ns, "thief", lambda v: condition(v, "Scheduled").get("reason") == "MacAddressInUse", "refused"
    )
    assert vm["status"]["phase"] == "Pending"
    assert (
        f"asks for MAC {taken}, which VM first holds on network 'default'"
        in condition(vm, "Scheduled")["message"]
    )
    # A running VM that asks for it later is held, and keeps its own.
    fleet.apply_vm(ns, "later", networks=[{"name": "eth0"}], **ON_A)
    later = fleet.wait_phase(ns, "later", "Running")
    own = decode_macs(later["metadata"]["annotations"][MACS_ANNOTATION])["eth0"]
    patch_spec(tenant, ns, "later", {"networks": [{"name": "eth0", "macAddress": taken}]})
    vm = wait_accepted(fleet, ns, "later", "False", "MacAddressInUse")
    assert decode_macs(vm["metadata"]["annotations"][MACS_ANNOTATION])["eth0"] == own
    # Once the holder is gone, the MAC is free.
    fleet.kubectl("delete", "vm", "first", "-n", ns, "--wait=true")
    fleet.wait_phase(ns, "thief", "Running")


def test_a_tenant_cannot_skip_admission_by_writing_the_record(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    fleet.apply_vm(ns, "sly", **ON_A)
    vm = fleet.wait_phase(ns, "sly", "Running")
    record = vm["metadata"]["annotations"][ADMITTED_ANNOTATION]
    forged = record.replace("cpus=1", "cpus=64")
    err = refused(tenant, "annotate", "vm", "sly", f"{ADMITTED_ANNOTATION}={forged}", "--overwrite")
    assert "records of what it admitted" in err
