"""VMs started again on another node from their images, on the fleet with a real apiserver, the
controller and two more agents of our own (libvirt's test driver): a drain's `Restart`
eviction (and `LiveMigrateIfPossible`'s fallback), and the VMs of a node given up for lost.
Only VMs whose owners set ``spec.allowDiskLoss`` go; the others stay and say why.

The two nodes are this module's (label zone=r, tainted for its VMs only), so draining one
and killing the other's agent touch no other test's VM. The test driver runs no guest, so what
is checked is the control: who is bound where, what each agent holds, what the VMs say."""

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from formation_vmm.api.names import API_VERSION, EVICTION_ANNOTATION, NODE_LABEL, RESTART_ELSEWHERE_ANNOTATION
from formation_vmm.devcluster.cluster import (
    TEST_DRIVER_ALLOCATABLE,
    OperatorProcess,
    register_node,
    service_account_kubeconfig,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.processes import stop
from tests.support.agentless import beating
from tests.support.fleet import FAST, TEST_NODE_RESERVED_CPUS, TINY, Fleet
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane

NODES = ("node-r1", "node-r2")
NS = "evict"
ON_R = {
    **TINY,
    "nodeSelector": {"zone": "r"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "restart", "effect": "NoSchedule"}],
    "terminationGracePeriodSeconds": 0,
}
HOLD = "hold=here:NoSchedule"
# What start_controller sets for each process it starts (a new port, its address).
RUN_ENV = (
    "VMM_API_PORT",
    "VMM_API_HOST",
    "VMM_ACCESS_PORT",
)  # keeps new VMs off a node while the test fills the other


@pytest.fixture(scope="module")
def nodes(fleet: Fleet) -> Iterator[dict[str, OperatorProcess]]:
    """Two agents of this module's own, as the fleet's are (node-bound tokens, test driver)."""
    agents = {}
    for node in NODES:
        register_node(fleet.kubectl, node, {"zone": "r"}, TEST_DRIVER_ALLOCATABLE)
        fleet.kubectl("taint", "node", node, "dedicated=restart:NoSchedule", "--overwrite")
        agents[node] = start_agent(
            fleet.plane,
            node,
            "test:///default",
            "test",
            {**FAST, "VMM_RESERVED_CPUS": str(TEST_NODE_RESERVED_CPUS)},
            kubeconfig=service_account_kubeconfig(fleet.kubectl, fleet.plane, "formation-vmm-agent", node),
        )
    fleet.kubectl("create", "namespace", NS)
    try:
        for agent in agents.values():
            agent.wait_ready()
        yield agents
    finally:
        fleet.kubectl("delete", "vm", "--all", "-n", NS, "--wait=true", "--timeout=60s", check=False)
        for agent in agents.values():
            stop(agent.pid)
            # Or the control plane, seeing it dead, would refuse to start again (restart_apiserver).
            fleet.plane.processes.forget(agent.name)
        for node in NODES:
            fleet.kubectl("delete", "node", node, check=False)


def held(agent: OperatorProcess) -> set[str]:
    """The names of this module's VMs the agent holds a domain for."""
    with urllib.request.urlopen(f"{agent.debug_url}/vms", timeout=5) as resp:
        return {d["name"] for d in json.load(resp) if d["namespace"] == NS}


def node_of(vm: dict[str, Any]) -> str:
    return str(vm["metadata"].get("labels", {}).get(NODE_LABEL, ""))


def annotation(vm: dict[str, Any], key: str) -> str:
    return str(vm["metadata"].get("annotations", {}).get(key, ""))


def image_nodes(fleet: Fleet, name: str) -> set[str]:
    """The nodes with an entry in VmImage ``name``'s status."""
    got = json.loads(fleet.kubectl("get", "vmimg", name, "-n", NS, "-o", "json"))
    return {n["name"] for n in (got.get("status") or {}).get("nodes") or []}


def events(fleet: Fleet, vm: str, namespace: str = NS) -> list[tuple[str, str]]:
    out = fleet.kubectl(
        "get", "events", "-n", namespace, "--field-selector", f"involvedObject.name={vm}", "-o", "json"
    )
    return [(e["reason"], e["message"]) for e in json.loads(out)["items"]]


def test_a_drain_restarts_elsewhere_the_vms_that_allow_it(
    fleet: Fleet, nodes: dict[str, OperatorProcess]
) -> None:
    r1, r2 = NODES
    fleet.kubectl("taint", "node", r2, HOLD, "--overwrite")
    fleet.apply_vm(NS, "restart-me", **ON_R, evictionStrategy="Restart", allowDiskLoss=True)
    fleet.apply_vm(NS, "keep-my-disks", **ON_R, evictionStrategy="Restart")
    # It cannot move live (it is stopped), so LiveMigrateIfPossible falls back to a restart.
    fleet.apply_vm(NS, "halted", **ON_R, runStrategy="Halted", allowDiskLoss=True)
    for name in ("restart-me", "keep-my-disks"):
        assert node_of(fleet.wait_phase(NS, name, "Running")) == r1
    assert node_of(fleet.wait_phase(NS, "halted", "Stopped")) == r1
    uid = fleet.vm(NS, "restart-me")["metadata"]["uid"]
    assert held(nodes[r1]) == {"restart-me", "keep-my-disks", "halted"}
    fleet.kubectl("taint", "node", r2, "hold-")

    out = fleet.plugin("drain", r1, "--timeout", "90")
    assert out.returncode == 0, out.stderr
    assert f"node/{r1} drained; 1 stay" in out.stdout, out.stdout
    assert "keep-my-disks: evictionStrategy Restart, and a restart on another node would lose" in out.stderr

    moved = fleet.wait_phase(NS, "restart-me", "Running")
    assert node_of(moved) == r2 and moved["status"]["nodeName"] == r2
    assert moved["metadata"]["uid"] == uid  # the same VM, bound again: not a new one
    assert moved["metadata"]["finalizers"] == [f"agent.vmm.formation.cloud/{r2}"]
    assert annotation(moved, RESTART_ELSEWHERE_ANNOTATION) == annotation(moved, EVICTION_ANNOTATION) == ""
    reasons = dict(events(fleet, "restart-me"))
    assert "stopping it, to start it on another node" in reasons["Evicting"]
    assert f"starts on node {r2} from its images" in reasons["RestartedElsewhere"]
    fleet.wait_vm(
        NS,
        "halted",
        lambda vm: (
            node_of(vm) == r2
            and vm.get("status", {}).get("nodeName") == r2
            and vm["status"].get("phase") == "Stopped"
        ),
        f"bound to {r2}, and Stopped there",
    )

    # The source removed the stopped domains and their files as orphans'; the other stays.
    wait_for(lambda: held(nodes[r1]) == {"keep-my-disks"}, 30, f"{r1} to hold only keep-my-disks")
    assert held(nodes[r2]) == {"restart-me", "halted"}
    assert not (fleet.node_dir(r1) / "disks" / NS / "restart-me").exists()
    stayed = fleet.vm(NS, "keep-my-disks")
    assert node_of(stayed) == r1 and stayed["status"]["phase"] == "Running"
    assert "set spec.allowDiskLoss: true" in annotation(stayed, EVICTION_ANNOTATION)

    out = fleet.plugin("uncordon", r1)
    assert out.returncode == 0, out.stderr
    fleet.wait_vm(NS, "keep-my-disks", lambda vm: not annotation(vm, EVICTION_ANNOTATION), "its note gone")


def test_a_tenant_cannot_stop_a_vm_for_a_restart_elsewhere(
    fleet: Fleet, nodes: dict[str, OperatorProcess]
) -> None:
    """The annotation that stops a VM for a restart elsewhere is the controller's."""
    tenant = fleet.user(NS, "tenant", "edit")
    out = fleet.kubectl.run(
        "--kubeconfig",
        str(tenant),
        "annotate",
        "vm",
        "keep-my-disks",
        "-n",
        NS,
        f"{RESTART_ELSEWHERE_ANNOTATION}=node-r1",
    )
    assert out.returncode != 0
    assert "vmm.formation.cloud/restart-elsewhere is the controller's" in out.stderr


def test_the_vms_of_a_node_given_up_for_lost_start_elsewhere_if_allowed(
    fleet: Fleet, nodes: dict[str, OperatorProcess]
) -> None:
    r1, r2 = NODES
    fleet.kubectl("delete", "vm", "--all", "-n", NS, "--wait=true", "--timeout=60s")
    fleet.kubectl("taint", "node", r1, HOLD, "--overwrite")
    fleet.apply_vm(NS, "cattle", **ON_R, allowDiskLoss=True)  # the default strategy
    fleet.apply_vm(NS, "pet", **ON_R, evictionStrategy="Restart")
    for name in ("cattle", "pet"):
        assert node_of(fleet.wait_phase(NS, name, "Running")) == r2
    fleet.kubectl("taint", "node", r1, "hold-")
    # An image every node imports (or fails to: nothing listens there): each agent writes its
    # node's entry in the image's status.
    fleet.kubectl(
        "apply",
        "-f",
        "-",
        input_text=json.dumps(
            {
                "apiVersion": "vmm.formation.cloud/v1alpha1",
                "kind": "VmImage",
                "metadata": {"name": "everywhere", "namespace": NS},
                "spec": {"source": {"http": {"url": "http://127.0.0.1:9/none.raw"}}, "prefetch": "AllNodes"},
            }
        ),
    )
    wait_for(lambda: {r1, r2} <= image_nodes(fleet, "everywhere"), 60, "both nodes' entries in the image")

    stop(nodes[r2].pid)  # the node dies with its agent (the test driver's domains go with it)
    fleet.plane.processes.forget(nodes[r2].name)
    fleet.wait_phase(NS, "cattle", "Unknown", timeout=30)
    # Silence alone never moves a VM: the node may only be cut off, its guests running on.
    fleet.wait_phase(NS, "pet", "Unknown", timeout=30)
    assert node_of(fleet.vm(NS, "cattle")) == r2

    fleet.kubectl("taint", "node", r2, "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute")
    cattle = fleet.wait_vm(NS, "cattle", lambda vm: node_of(vm) == r1, f"on {r1}")
    assert cattle["metadata"]["finalizers"] == [f"agent.vmm.formation.cloud/{r1}"]
    assert fleet.wait_phase(NS, "cattle", "Running")["status"]["nodeName"] == r1
    assert "cattle" in held(nodes[r1])
    reasons = dict(events(fleet, "cattle"))
    assert f"node {r2} is lost (marked out of service" in reasons["RestartedElsewhere"]
    pet = fleet.wait_vm(NS, "pet", lambda vm: annotation(vm, EVICTION_ANNOTATION), "a note")
    assert node_of(pet) == r2 and pet["status"]["phase"] == "Unknown"
    assert "set spec.allowDiskLoss: true" in annotation(pet, EVICTION_ANNOTATION)
    assert annotation(pet, EVICTION_ANNOTATION).endswith("it waits for its node")

    # The Node deleted, and the owner allowing it now: the pet goes too.
    fleet.kubectl("delete", "node", r2)
    # The default network no longer counts the node (its agent wrote the entry, and is gone).
    wait_for(
        lambda: (
            r2
            not in {
                n["name"]
                for n in json.loads(fleet.kubectl("get", "vmnet", "default", "-o", "json"))["status"]["nodes"]
            }
        ),
        30,
        f"the default network to forget {r2}",
    )
    wait_for(lambda: r2 not in image_nodes(fleet, "everywhere"), 30, f"the image to forget {r2}")
    assert r1 in image_nodes(fleet, "everywhere")
    fleet.kubectl("delete", "vmimg", "everywhere", "-n", NS, "--wait=true", "--timeout=30s")
    fleet.kubectl("patch", "vm", "pet", "-n", NS, "--type=merge", "-p", '{"spec":{"allowDiskLoss":true}}')
    pet = fleet.wait_vm(NS, "pet", lambda vm: node_of(vm) == r1, f"on {r1}", timeout=30)
    assert fleet.wait_phase(NS, "pet", "Running")["status"]["nodeName"] == r1
    assert "its Node was deleted" in dict(events(fleet, "pet"))["RestartedElsewhere"]
    fleet.wait_vm(NS, "pet", lambda vm: not annotation(vm, EVICTION_ANNOTATION), "its note gone")


def test_a_restart_mark_left_by_a_drain_that_ended_while_no_controller_ran_goes(
    fleet: Fleet, nodes: dict[str, OperatorProcess]
) -> None:
    """A drain annotated a VM to stop it, and the node was uncordoned while no controller ran:
    the controller, started again, removes the mark and the VM starts again on its node. The
    state is set by hand, as a cluster admin may: the real sequence needs the controller to die
    between two writes of its own, which no signal can time."""
    fleet.kubectl("delete", "vm", "--all", "-n", NS, "--wait=true", "--timeout=60s")
    fleet.apply_vm(NS, "left", **ON_R, evictionStrategy="Restart", allowDiskLoss=True)
    node = node_of(fleet.wait_phase(NS, "left", "Running"))
    old = fleet.controller
    stop(old.pid)
    fleet.kubectl(
        "annotate", "vm", "left", "-n", NS,
        f"{RESTART_ELSEWHERE_ANNOTATION}={node}", f"{EVICTION_ANNOTATION}=left over",
    )  # fmt: skip
    fleet.wait_phase(NS, "left", "Stopped")  # its agent stops it, as for a drain
    kept = {k: v for k, v in old.env.items() if k.startswith("VMM_") and k not in RUN_ENV}
    fleet.controller = start_controller(fleet.plane, kept, kubeconfig=Path(old.env["KUBECONFIG"]))
    fleet.controller.wait_ready()
    back = fleet.wait_vm(
        NS,
        "left",
        lambda vm: (
            not annotation(vm, RESTART_ELSEWHERE_ANNOTATION) and vm["status"].get("phase") == "Running"
        ),
        "to start again, its marks gone",
        timeout=90,
    )
    assert node_of(back) == node and not annotation(back, EVICTION_ANNOTATION)


def held_snapshot(namespace: str, name: str, vm: str, node: str) -> dict[str, Any]:
    """A VmSnapshot of ``vm`` as ``node``'s agent claims one: its label and its finalizer."""
    held = {"labels": {NODE_LABEL: node}, "finalizers": [f"agent.vmm.formation.cloud/{node}"]}
    meta = {"name": name, "namespace": namespace, **held}
    return {"apiVersion": API_VERSION, "kind": "VmSnapshot", "metadata": meta, "spec": {"vmName": vm}}


def test_a_vm_deleted_while_its_node_is_lost_goes_without_its_agent(fleet: Fleet, ns: str) -> None:
    """A VM bound to a node whose agent will never come back (its Node deleted, nothing beating)
    would wait forever for that agent to remove its finalizer, and so would its snapshots: the
    controller removes them once it gives the node up. The node is agentless
    (tests/support/agentless.py): the VM is bound there, and nothing ever runs it, as on a node
    that died right after the binding. With no agent to claim the snapshot, the test claims it
    as the agent does (label, finalizer, the VM as owner), as an admin."""
    lost = "lost-d1"
    stop, beater = beating(fleet, (lost,), {"zone": "lost"}, "lost", "2", "1Gi")
    try:
        toleration = {"key": "dedicated", "operator": "Equal", "value": "lost", "effect": "NoSchedule"}
        fleet.apply_vm(ns, "doomed", **TINY, nodeSelector={"zone": "lost"}, tolerations=[toleration])
        bound = fleet.wait_vm(ns, "doomed", lambda vm: node_of(vm) == lost, f"bound to {lost}")
        assert f"agent.vmm.formation.cloud/{lost}" in bound["metadata"]["finalizers"]
        snapshot = held_snapshot(ns, "doomed-snap", "doomed", lost)
        owner = {"apiVersion": API_VERSION, "kind": "VirtualMachine", "name": "doomed"}
        snapshot["metadata"]["ownerReferences"] = [
            {**owner, "uid": bound["metadata"]["uid"], "blockOwnerDeletion": False}
        ]
        fleet.apply(snapshot)
        fleet.kubectl("delete", "vm", "doomed", "-n", ns, "--wait=false")
        deleting = fleet.vm(ns, "doomed")  # its agent is the one to let it go, and there is none
        assert deleting["metadata"]["deletionTimestamp"] and deleting["metadata"]["finalizers"]
    finally:
        stop.set()
        beater.join(10)
        fleet.kubectl("delete", "node", lost, check=False)
    # The fleet's controller gives a deleted Node up after VMM_NODE_LOST_SECONDS (6 s).
    fleet.wait_gone("vm", ns, "doomed", timeout=60)
    reasons = dict(events(fleet, "doomed", ns))
    assert reasons["DeletedWithoutAgent"].startswith(f"node {lost} is lost (its Node was deleted)")
    # Its dependent, deleted by the garbage collector once the VM is gone, waits for no agent.
    fleet.wait_gone("vmsnapshot", ns, "doomed-snap", timeout=60)


def test_snapshots_deleted_while_their_node_is_lost_go_unless_their_vm_waits_there(
    fleet: Fleet, ns: str
) -> None:
    """Snapshots held by a lost node's agent, deleted: one of a VM bound to another node (it
    restarted elsewhere) and one of a VM that no longer exists go without that agent; one of a VM
    still bound to the lost node waits with its VM, and goes once the VM is deleted; one deleted
    once no VM is bound to the node goes too. With no agent on the agentless node, the test
    claims the snapshots as the agent does (label, finalizer), as an admin."""
    lost = "lost-d2"
    finalizer = f"agent.vmm.formation.cloud/{lost}"
    stop, beater = beating(fleet, (lost,), {"zone": "lost-2"}, "lost-2", "2", "1Gi")
    try:
        toleration = {"key": "dedicated", "operator": "Equal", "value": "lost-2", "effect": "NoSchedule"}
        fleet.apply_vm(ns, "waits", **TINY, nodeSelector={"zone": "lost-2"}, tolerations=[toleration])
        fleet.wait_vm(ns, "waits", lambda vm: node_of(vm) == lost, f"bound to {lost}")
        fleet.apply_vm(ns, "moved", **TINY, nodeSelector={"zone": "a"})
        fleet.wait_vm(ns, "moved", lambda vm: node_of(vm) == "node-a", "bound to node-a")
        for name, vm in (("of-waits", "waits"), ("of-moved", "moved"), ("of-gone", "gone")):
            fleet.apply(held_snapshot(ns, name, vm, lost))
            fleet.kubectl("delete", "vmsnapshot", name, "-n", ns, "--wait=false")
    finally:
        stop.set()
        beater.join(10)
        fleet.kubectl("delete", "node", lost, check=False)
    # The fleet's controller gives a deleted Node up after VMM_NODE_LOST_SECONDS (6 s).
    fleet.wait_gone("vmsnapshot", ns, "of-moved", timeout=60)
    fleet.wait_gone("vmsnapshot", ns, "of-gone", timeout=60)
    reasons = dict(events(fleet, "of-moved", ns))
    assert reasons["DeletedWithoutAgent"].startswith(f"node {lost} is lost (its Node was deleted)")
    # The pass that let those two go listed this one too: it waits with its VM.
    waiting = get_json(fleet.kubectl, "vmsnapshot", "of-waits", "-n", ns)["metadata"]
    assert waiting["deletionTimestamp"] and waiting["finalizers"] == [finalizer]
    fleet.kubectl("delete", "vm", "waits", "-n", ns, "--wait=false")
    fleet.wait_gone("vm", ns, "waits", timeout=60)
    fleet.wait_gone("vmsnapshot", ns, "of-waits", timeout=60)
    # No VM is bound to the node now, so nothing counts it as given up but its missing Node:
    # a snapshot held by its agent, deleted now, goes all the same.
    fleet.apply(held_snapshot(ns, "of-moved-later", "moved", lost))
    fleet.kubectl("delete", "vmsnapshot", "of-moved-later", "-n", ns, "--wait=false")
    fleet.wait_gone("vmsnapshot", ns, "of-moved-later", timeout=60)
