"""A compromised agent holds one node, not the cluster; a tenant cannot steer placement. Each
attack is made for real: against the real apiserver, with tokens issued the way the DaemonSet's
are (bound to a Node, so they carry authentication.kubernetes.io/node-name) and the RBAC and
admission policies we ship (manifests/base), installed by the fleet."""

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from formation_vmm.api.names import (
    ADDRESSES_ANNOTATION,
    ADMITTED_ANNOTATION,
    MACS_ANNOTATION,
    NODE_LABEL,
    QEMU_UID_ANNOTATION,
    agent_finalizer,
)
from formation_vmm.devcluster.cluster import Kubectl, service_account_kubeconfig
from tests.support.fleet import TINY, Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


def as_(fleet: Fleet, kubeconfig: Path) -> Kubectl:
    return Kubectl(fleet.kubectl.binary, kubeconfig)


@pytest.fixture(scope="module")
def agent_a(fleet: Fleet) -> Kubectl:
    """The agent of node-a, as an attacker who took over that node would hold it."""
    return as_(fleet, service_account_kubeconfig(fleet.kubectl, fleet.plane, "formation-vmm-agent", "node-a"))


@pytest.fixture(scope="module")
def agent_unbound(fleet: Fleet) -> Kubectl:
    """The agent's service account with a token bound to no node."""
    return as_(fleet, service_account_kubeconfig(fleet.kubectl, fleet.plane, "formation-vmm-agent"))


def refused(kubectl: Kubectl, *args: str, input_text: str | None = None) -> str:
    proc = kubectl.run(*args, input_text=input_text)
    assert proc.returncode != 0, f"kubectl {' '.join(args)} was allowed"
    return proc.stderr


def merge(kubectl: Kubectl, *target: str, patch: dict[str, Any], status: bool = False) -> Any:
    args = ["patch", *target, "--type=merge", "-p", json.dumps(patch)]
    if status:
        args.append("--subresource=status")
    return kubectl.run(*args)


def test_an_agent_changes_only_its_own_node_and_only_our_annotations(fleet: Fleet, agent_a: Kubectl) -> None:
    ours = {"metadata": {"annotations": {"vmm.formation.cloud/probe": "x"}}}
    assert merge(agent_a, "node", "node-a", patch=ours).returncode == 0
    err = refused(agent_a, "patch", "node", "node-b", "--type=merge", "-p", json.dumps(ours))
    assert "may not change node node-b" in err
    for change in (
        {"metadata": {"labels": {"vmm.formation.cloud/hypervisor": "false"}}},
        {"metadata": {"labels": {"zone": "b"}}},
        {"metadata": {"annotations": {"node.alpha.kubernetes.io/ttl": "15"}}},
        {"spec": {"unschedulable": True}},
    ):
        err = refused(agent_a, "patch", "node", "node-a", "--type=merge", "-p", json.dumps(change))
        assert "only the vmm.formation.cloud/ annotations of its node" in err, change


def test_an_agent_touches_only_the_status_of_its_own_nodes_vms(
    fleet: Fleet, ns: str, agent_a: Kubectl
) -> None:
    fleet.apply_vm(ns, "on-a", nodeSelector={"zone": "a"}, **TINY)
    fleet.apply_vm(ns, "on-b", nodeSelector={"zone": "b"}, **TINY)
    fleet.wait_phase(ns, "on-a", "Running")
    fleet.wait_phase(ns, "on-b", "Running")
    message = {"status": {"message": "written by the agent of node-a"}}
    assert merge(agent_a, "vm", "on-a", "-n", ns, patch=message, status=True).returncode == 0
    err = refused(
        agent_a,
        "patch",
        "vm",
        "on-b",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(message),
    )
    assert "may not change a VM bound to another node" in err
    for change in (
        {"spec": {"memory": "4Gi"}},
        {"metadata": {"labels": {NODE_LABEL: "node-b"}}},
        {"metadata": {"finalizers": [agent_finalizer("node-a"), agent_finalizer("node-b")]}},
    ):
        err = refused(agent_a, "patch", "vm", "on-a", "-n", ns, "--type=merge", "-p", json.dumps(change))
        assert "never its spec, labels or annotations" in err, change
    moved = {"status": {"nodeName": "node-b"}}
    err = refused(
        agent_a,
        "patch",
        "vm",
        "on-a",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(moved),
    )
    assert "may not report a VM as on another node" in err


def test_an_agent_reads_no_secret(fleet: Fleet, ns: str, agent_a: Kubectl) -> None:
    fleet.kubectl("create", "secret", "generic", "tenant-secret", "-n", ns, "--from-literal=password=hunter2")
    err = refused(agent_a, "get", "secret", "tenant-secret", "-n", ns)
    assert "Forbidden" in err
    assert "no" in agent_a("auth", "can-i", "get", "secrets", "-A", check=False)


def test_an_agent_writes_only_its_own_entry_of_an_image(fleet: Fleet, ns: str, agent_a: Kubectl) -> None:
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VmImage",
        "metadata": {"name": "shared", "namespace": ns},
        "spec": {"source": {"hostPath": {"path": "nothing.raw"}}},
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))
    mine = {"status": {"nodes": [{"name": "node-a", "phase": "Pending"}]}}
    assert merge(agent_a, "vmimg", "shared", "-n", ns, patch=mine, status=True).returncode == 0
    forged = {
        "status": {"nodes": [{"name": "node-a", "phase": "Pending"}, {"name": "node-b", "phase": "Failed"}]}
    }
    err = refused(
        agent_a,
        "patch",
        "vmimg",
        "shared",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(forged),
    )
    assert "only its own node's entry" in err


def test_a_token_bound_to_no_node_is_refused(fleet: Fleet, agent_unbound: Kubectl) -> None:
    ours = {"metadata": {"annotations": {"vmm.formation.cloud/probe": "y"}}}
    err = refused(agent_unbound, "patch", "node", "node-a", "--type=merge", "-p", json.dumps(ours))
    assert "must be bound to its node" in err


@pytest.fixture
def tenant(fleet: Fleet, ns: str) -> Kubectl:
    """A namespace user who may do anything to VMs and snapshots in their namespace."""
    rules = [{"apiGroups": ["vmm.formation.cloud"], "resources": ["*"], "verbs": ["*"]}]
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tenant", "namespace": ns}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "vm-admin", "namespace": ns},
            "rules": rules,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "tenant", "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "vm-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}],
        },
    ]
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump_all(docs))
    return as_(fleet, service_account_kubeconfig(fleet.kubectl, fleet.plane, "tenant", namespace=ns))


def vm_doc(ns: str, name: str, **meta: Any) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "vmm.formation.cloud/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": ns, **meta},
            "spec": {"cpus": 1, "memory": "64Mi"},
        }
    )


def test_a_tenant_cannot_bind_a_vm_to_a_node(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    err = refused(tenant, "create", "-f", "-", input_text=vm_doc(ns, "pinned", labels={NODE_LABEL: "node-q"}))
    assert "only the controller binds a VM" in err
    tenant("create", "-f", "-", input_text=vm_doc(ns, "honest", labels={"app": "web"}))
    vm = fleet.wait_phase(ns, "honest", "Running")
    err = refused(tenant, "label", "vm", "honest", f"{NODE_LABEL}=node-q", "--overwrite")
    assert "only the controller binds a VM" in err
    assert fleet.vm(ns, "honest")["metadata"]["labels"][NODE_LABEL] == vm["status"]["nodeName"]


def test_a_tenant_cannot_strip_or_forge_an_agents_finalizer(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    tenant("create", "-f", "-", input_text=vm_doc(ns, "held"))
    vm = fleet.wait_phase(ns, "held", "Running")
    assert vm["metadata"]["finalizers"]
    err = refused(tenant, "patch", "vm", "held", "--type=merge", "-p", '{"metadata": {"finalizers": null}}')
    assert "the agents' finalizers" in err
    forged = {"metadata": {"finalizers": [*vm["metadata"]["finalizers"], agent_finalizer("node-q")]}}
    err = refused(tenant, "patch", "vm", "held", "--type=merge", "-p", json.dumps(forged))
    assert "the agents' finalizers" in err


def test_per_vm_limits_are_the_admins(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    big = yaml.safe_load(vm_doc(ns, "big"))
    big["spec"]["cpus"] = 128
    err = refused(tenant, "create", "-f", "-", input_text=yaml.safe_dump(big))
    assert "at most 64 vCPUs in this cluster (it asks for 128)" in err
    big["spec"] = {"cpus": 2, "memory": "1Ti"}
    assert "at most 256Gi of memory" in refused(tenant, "create", "-f", "-", input_text=yaml.safe_dump(big))
    wide = yaml.safe_load(vm_doc(ns, "wide"))
    wide["spec"]["cpus"] = 2
    tenant("create", "-f", "-", input_text=yaml.safe_dump(wide))
    fleet.wait_phase(ns, "wide", "Running")
    limits = json.dumps({"data": {"maxCpus": "1"}})
    fleet.kubectl(
        "patch", "configmap", "formation-vmm-limits", "-n", "formation-vmm", "--type=merge", "-p", limits
    )
    try:
        big["spec"] = {"cpus": 4, "memory": "64Mi"}
        assert "at most 1 vCPUs" in refused(tenant, "create", "-f", "-", input_text=yaml.safe_dump(big))
        # A VM made under the old limit: a change of what it asks for meets the new one...
        resize = json.dumps({"spec": {"memory": "96Mi"}})
        assert "at most 1 vCPUs" in refused(tenant, "patch", "vm", "wide", "--type=merge", "-p", resize)
        # ... but what leaves its spec alone is not refused: a label, and its deletion, which
        # needs its agent to remove its finalizer (an update of the VM).
        tenant("label", "vm", "wide", "tier=gold")
        tenant("delete", "vm", "wide", "--wait=false")
        fleet.wait_gone("vm", ns, "wide")
    finally:
        restore = json.dumps({"data": {"maxCpus": "64"}})
        fleet.kubectl(
            "patch", "configmap", "formation-vmm-limits", "-n", "formation-vmm", "--type=merge", "-p", restore
        )


def test_an_agent_cannot_change_or_invent_an_assigned_address(
    fleet: Fleet, ns: str, agent_a: Kubectl
) -> None:
    fleet.apply_vm(ns, "addressed", networks=[{"name": "eth0"}], nodeSelector={"zone": "a"}, **TINY)
    vm = fleet.wait_phase(ns, "addressed", "Running")
    eth0 = vm["status"]["interfaces"][0]
    assert eth0["infoSource"].startswith("ipam")
    target = ("patch", "vm", "addressed", "-n", ns, "--subresource=status", "--type=merge", "-p")
    assert vm["metadata"]["annotations"][ADDRESSES_ANNOTATION] == f"eth0=default/{eth0['ipAddress']}"
    target = ("patch", "vm", "addressed", "-n", ns, "--subresource=status", "--type=merge", "-p")
    taken = {"status": {"interfaces": [{**eth0, "ipAddress": "10.123.255.1"}]}}
    assert "may not show an address other than the one the controller assigned" in refused(
        agent_a, *target, json.dumps(taken)
    )
    invented = {
        "status": {
            "interfaces": [
                eth0,
                {"name": "eth1", "network": "default", "ipAddress": "10.123.0.9", "infoSource": "ipam"},
            ]
        }
    }
    assert "may not show an address other than the one the controller assigned" in refused(
        agent_a, *target, json.dumps(invented)
    )
    # Nor rewrite the record itself.
    moved = {"metadata": {"annotations": {ADDRESSES_ANNOTATION: "eth0=default/10.123.255.1"}}}
    err = refused(agent_a, "patch", "vm", "addressed", "-n", ns, "--type=merge", "-p", json.dumps(moved))
    assert "never its spec, labels or annotations" in err
    confirmed = {"status": {"interfaces": [{**eth0, "infoSource": "ipam, lease"}]}}
    assert merge(agent_a, "vm", "addressed", "-n", ns, patch=confirmed, status=True).returncode == 0


def test_a_tenant_cannot_assign_itself_an_address(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    doc = yaml.safe_load(
        vm_doc(ns, "squatter", annotations={ADDRESSES_ANNOTATION: "eth0=default/10.123.0.2"})
    )
    doc["spec"]["networks"] = [{"name": "eth0"}]
    err = refused(tenant, "create", "-f", "-", input_text=yaml.safe_dump(doc))
    assert "vmm.formation.cloud/addresses is the controller's record" in err
    del doc["metadata"]["annotations"]
    tenant("create", "-f", "-", input_text=yaml.safe_dump(doc))
    vm = fleet.wait_phase(ns, "squatter", "Running")
    given = vm["metadata"]["annotations"][ADDRESSES_ANNOTATION]
    for args in (
        (f"{ADDRESSES_ANNOTATION}=eth0=default/10.123.0.2", "--overwrite"),
        (f"{ADDRESSES_ANNOTATION}-",),
    ):
        err = refused(tenant, "annotate", "vm", "squatter", *args)
        assert "vmm.formation.cloud/addresses is the controller's record" in err
    assert fleet.vm(ns, "squatter")["metadata"]["annotations"][ADDRESSES_ANNOTATION] == given


def test_a_tenant_cannot_forge_what_the_controller_admitted_or_the_macs_it_gave(
    fleet: Fleet, ns: str, tenant: Kubectl
) -> None:
    """The admitted record says what the agent may apply of a spec (issue 26, finding 1); the
    MAC record, which MAC an interface keeps (finding 6); the QEMU uid, which uid its QEMU runs
    as, and so which VM's files it may touch (finding 10). None is the tenant's to write."""
    doc = yaml.safe_load(vm_doc(ns, "recorded"))
    doc["spec"]["networks"] = [{"name": "eth0"}]
    for key, value in (
        (ADMITTED_ANNOTATION, "digest=0000000000000000,cpus=1,memory=67108864,disk=0"),
        (MACS_ANNOTATION, "eth0=02:00:00:00:00:01"),
        (QEMU_UID_ANNOTATION, "1000000001"),
    ):
        forged = {**doc, "metadata": {**doc["metadata"], "annotations": {key: value}}}
        err = refused(tenant, "create", "-f", "-", input_text=yaml.safe_dump(forged))
        assert "records of what it admitted of a VM's spec" in err, key
    tenant("create", "-f", "-", input_text=yaml.safe_dump(doc))
    vm = fleet.wait_phase(ns, "recorded", "Running")
    records = {
        k: vm["metadata"]["annotations"][k]
        for k in (ADMITTED_ANNOTATION, MACS_ANNOTATION, QEMU_UID_ANNOTATION)
    }
    assert records[MACS_ANNOTATION].startswith("eth0=02:")
    for key in records:
        for args in ((f"{key}=x", "--overwrite"), (f"{key}-",)):
            err = refused(tenant, "annotate", "vm", "recorded", *args)
            assert "records of what it admitted" in err, args
    assert {k: fleet.vm(ns, "recorded")["metadata"]["annotations"][k] for k in records} == records


def test_a_tenant_cannot_pass_a_migration_off_as_a_drains(fleet: Fleet, ns: str, tenant: Kubectl) -> None:
    """The drain finds its own migrations by this label (issue 26, finding 13): a tenant's own
    labeled one would be taken for the drain's, and a name the drain would use could be taken
    before it (the drain now lets the apiserver pick its names)."""
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VmMigration",
        "metadata": {"name": "decoy", "namespace": ns, "labels": {"vmm.formation.cloud/drain": "node-a"}},
        "spec": {"vmName": "absent"},
    }
    err = refused(tenant, "create", "-f", "-", input_text=yaml.safe_dump(doc))
    assert "marks the migrations a drain made" in err
    del doc["metadata"]["labels"]
    tenant("create", "-f", "-", input_text=yaml.safe_dump(doc))
    err = refused(tenant, "label", "vmmig", "decoy", "vmm.formation.cloud/drain=node-a")
    assert "marks the migrations a drain made" in err


def test_an_agent_writes_only_its_own_entry_of_a_network(fleet: Fleet, agent_a: Kubectl) -> None:
    forged = {"status": {"nodes": [{"name": "node-b", "phase": "Failed", "message": "forged"}]}}
    args = ("patch", "vmnetwork", "default", "--subresource=status", "--type=merge", "-p", json.dumps(forged))
    assert "only its own node's entry of a network's status" in refused(agent_a, *args)


def test_an_agent_writes_only_the_status_of_migrations_from_or_to_its_node(
    fleet: Fleet, ns: str, agent_a: Kubectl
) -> None:
    """Two migrations whose nodes the admin sets (the controller's part): node-a's agent writes
    the one leaving node-a, not the other, and never where either goes."""
    for name, source, target in (("a-to-b", "node-a", "node-b"), ("b-to-q", "node-b", "node-q")):
        fleet.apply(
            {
                "apiVersion": "vmm.formation.cloud/v1alpha1",
                "kind": "VmMigration",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"vmName": "absent"},
            }
        )
        # The controller fails it at once (no such VM); then its nodes are set, as if it had run.
        wait_for(lambda n=name: (fleet.kubectl("get", "vmmig", n, "-n", ns, "-o", "jsonpath={.status.phase}")
                                 == "Failed"), 30, "the controller to fail it")  # fmt: skip
        nodes = {"status": {"sourceNode": source, "targetNode": target}}
        assert merge(fleet.kubectl, "vmmig", name, "-n", ns, patch=nodes, status=True).returncode == 0
    note = {"status": {"message": "written by the agent of node-a"}}
    assert merge(agent_a, "vmmig", "a-to-b", "-n", ns, patch=note, status=True).returncode == 0
    for name, patch in (
        ("b-to-q", note),
        ("a-to-b", {"status": {"targetNode": "node-a"}}),
        ("a-to-b", {"status": {"sourceNode": "node-q"}}),
    ):
        args = (
            "patch",
            "vmmig",
            name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(patch),
        )
        assert "only the status of migrations from or to its node" in refused(agent_a, *args), (name, patch)
    # The object itself is out of its reach (the RBAC grants no patch; the policy covers only
    # the status): a label or a finalizer could hold a migration or hide it from a drain.
    for change in ({"metadata": {"labels": {"vmm.formation.cloud/drain": "node-b"}}},
                   {"metadata": {"finalizers": ["agent.vmm.formation.cloud/node-a"]}}):  # fmt: skip
        err = refused(agent_a, "patch", "vmmig", "a-to-b", "-n", ns, "--type=merge", "-p", json.dumps(change))
        assert "forbidden" in err.lower(), change
