"""VM lifecycle across a controller and three agents (see fleet.py): placement, the plugin's
verbs, restarts, crashes per runStrategy, drift, node loss, deletion while an agent is down, a
controller killed mid-placement."""

import json
import os
import signal
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from formation_vmm.api.names import MACS_ANNOTATION, NODE_LABEL
from tests.support.fleet import ON_QEMU, QEMU_NODE, TINY, Fleet, condition
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane


def running(vm: dict) -> bool:  # type: ignore[type-arg]
    return vm.get("status", {}).get("phase") == "Running"


def test_placement_by_label(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "in-b", nodeSelector={"zone": "b"}, **TINY)
    vm = fleet.wait_phase(ns, "in-b", "Running")
    assert vm["status"]["nodeName"] == "node-b"
    assert vm["metadata"]["labels"][NODE_LABEL] == "node-b"
    assert [d["name"] for d in fleet.agent_vms("node-b")] == ["in-b"]


def test_capacity_unschedulable_then_placed(fleet: Fleet, ns: str) -> None:
    for i in range(4):  # 2 vCPUs each: fills node-a and node-b (4 each)
        fleet.apply_vm(ns, f"big-{i}", cpus=2, memory="64Mi")
    for i in range(4):
        fleet.wait_phase(ns, f"big-{i}", "Running")
    nodes = sorted(fleet.vm(ns, f"big-{i}")["status"]["nodeName"] for i in range(4))
    assert nodes == ["node-a", "node-a", "node-b", "node-b"]  # spread by least load

    fleet.apply_vm(ns, "one-too-many", cpus=2, memory="64Mi")
    vm = fleet.wait_vm(
        ns,
        "one-too-many",
        lambda v: condition(v, "Scheduled").get("reason") == "Unschedulable",
        "Unschedulable",
    )
    assert vm["status"]["phase"] == "Pending"
    assert condition(vm, "Scheduled")["message"] == (
        "0/3 hypervisor nodes can take the VM: "
        "1 have a taint the VM does not tolerate, 2 have too few free vCPUs"
    )
    fleet.kubectl("delete", "vm", "big-0", "-n", ns)
    vm = fleet.wait_phase(ns, "one-too-many", "Running", 30)
    assert condition(vm, "Scheduled")["status"] == "True"


def test_plugin_verbs(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "p", **TINY)
    fleet.wait_phase(ns, "p", "Running")
    for verb, phase in (
        ("stop", "Stopped"),
        ("start", "Running"),
        ("pause", "Paused"),
        ("resume", "Running"),
    ):
        out = fleet.plugin("-n", ns, verb, "p")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"virtualmachine {ns}/p is {phase}"
        assert fleet.vm(ns, "p")["status"]["phase"] == phase
    assert fleet.vm(ns, "p")["spec"]["runStrategy"] == "Always"

    before = fleet.vm(ns, "p")["status"]
    out = fleet.plugin("-n", ns, "restart", "p")
    assert out.returncode == 0, out.stderr
    after = fleet.vm(ns, "p")["status"]
    assert after["startedAt"] >= before["startedAt"] and after["lastRestartRequestedAt"]
    assert after["restartCount"] == before.get("restartCount", 0) + 1
    # A restart asked by a client whose clock runs a minute ahead, carried out: the plugin's next
    # one (stamped now, older than that) was no change and said "restarted" at once.
    ahead = (datetime.now(UTC) + timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = json.dumps({"spec": {"restartRequestedAt": ahead}})
    fleet.kubectl("patch", "vm", "p", "-n", ns, "--type=merge", "-p", patch)
    count = after["restartCount"]
    fleet.wait_vm(ns, "p", lambda v: v["status"].get("restartCount") == count + 1, "restarted")
    out = fleet.plugin("-n", ns, "restart", "p")
    assert out.returncode == 0, out.stderr
    assert fleet.vm(ns, "p")["status"]["restartCount"] == count + 2

    listed = fleet.plugin("-n", ns, "list")
    assert listed.returncode == 0
    assert listed.stdout.splitlines()[0].split() == ["NAME", "PHASE", "NODE", "IP", "CPUS", "MEMORY", "READY"]
    assert listed.stdout.splitlines()[1].split()[:2] == ["p", "Running"]

    assert (
        fleet.plugin("-n", ns, "pause", "p", "--no-wait").stdout.strip()
        == f"virtualmachine {ns}/p: pause requested"
    )
    fleet.wait_phase(ns, "p", "Paused")
    missing = fleet.plugin("-n", ns, "stop", "nope")
    assert missing.returncode == 1 and f"virtualmachine {ns}/nope not found" in missing.stderr

    # Who wrote what, as managedFields (and audit logs) tell it: each process by its own name.
    shown = get_json(fleet.kubectl, "vm", "p", "-n", ns, "--show-managed-fields")
    managers = {(f["manager"], f.get("subresource", "")) for f in shown["metadata"]["managedFields"]}
    assert {
        ("formation-vmm-controller", ""),  # the binding
        ("formation-vmm-agent", "status"),
        ("kubectl-vm", ""),  # the plugin's spec patches
    } <= managers, managers


def test_cpu_change_requires_restart(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "grow", **TINY)
    vm = fleet.wait_phase(ns, "grow", "Running")
    node = vm["status"]["nodeName"]
    fleet.kubectl("patch", "vm", "grow", "-n", ns, "--type=merge", "-p", '{"spec": {"cpus": 2}}')
    vm = fleet.wait_vm(
        ns, "grow", lambda v: condition(v, "RestartRequired").get("status") == "True", "RestartRequired"
    )
    assert "restart the VM to apply it" in condition(vm, "RestartRequired")["message"]
    assert [d["vcpus"] for d in fleet.agent_vms(node) if d["name"] == "grow"] == [1]
    assert fleet.plugin("-n", ns, "restart", "grow").returncode == 0
    vm = fleet.wait_vm(
        ns, "grow", lambda v: condition(v, "RestartRequired").get("status") == "False", "up to date"
    )
    assert [d["vcpus"] for d in fleet.agent_vms(node) if d["name"] == "grow"] == [2]
    assert vm["status"]["vcpus"] == 2


def test_interfaces_and_ip_in_status(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "net", networks=[{"name": "eth0"}], **TINY)
    vm = fleet.wait_vm(
        ns, "net", lambda v: (v.get("status", {}).get("interfaces") or [{}])[0].get("ipAddress"), "an IP"
    )
    iface = vm["status"]["interfaces"][0]
    # The controller's MAC, recorded at binding: locally administered, 40 bits of a digest.
    assert iface["name"] == "eth0" and iface["mac"].startswith("02:")
    assert fleet.vm(ns, "net")["metadata"]["annotations"][MACS_ANNOTATION] == f"eth0={iface['mac']}"
    table = fleet.kubectl(
        "get", "vm", "net", "-n", ns, "-o", "custom-columns=IP:.status.interfaces[0].ipAddress"
    )
    assert iface["ipAddress"] in table


@pytest.mark.parametrize(
    ("strategy", "restarted"), [("Always", True), ("RerunOnFailure", True), ("Once", False)]
)
def test_a_crash_is_answered_per_run_strategy(fleet: Fleet, ns: str, strategy: str, restarted: bool) -> None:
    # node-q has the host's 2 vCPUs: one VM per case keeps every case within capacity.
    fleet.apply_vm(ns, "crashy", runStrategy=strategy, **ON_QEMU)
    first = fleet.wait_phase(ns, "crashy", "Running", 90)
    os.kill(fleet.qemu_pid(f"{ns}_crashy"), signal.SIGKILL)  # QEMU dies: a crash
    if restarted:
        vm = fleet.wait_vm(
            ns,
            "crashy",
            lambda v: v.get("status", {}).get("restartCount", 0) >= 1 and running(v),
            "restarted",
            30,
        )
        assert vm["status"]["startedAt"] >= first["status"]["startedAt"]
        events = fleet.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=crashy")
        assert "Restarted" in events
    else:
        vm = fleet.wait_phase(ns, "crashy", "Failed", 30)
        # Two resyncs later (each looks at every VM of the node), it is still not restarted.
        agent = fleet.agents[QEMU_NODE]
        resyncs = fleet.metrics(agent)["vmm_agent_resyncs_total"]
        fleet.wait_metric_above(agent, "vmm_agent_resyncs_total", resyncs + 1)
        vm = fleet.vm(ns, "crashy")
        assert vm["status"]["phase"] == "Failed"
        assert vm["status"].get("restartCount", 0) == 0


def test_drift_is_repaired(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "drift", **ON_QEMU)
    vm = fleet.wait_phase(ns, "drift", "Running", 90)
    domain = f"{ns}_drift"
    fleet.virsh("destroy", domain)  # stopped behind the agent's back: started again (Always)
    fleet.virsh("undefine", domain)  # and its definition removed: defined again

    def repaired() -> bool:
        info = fleet.virsh("dominfo", domain)
        return "Persistent:     yes" in info and "State:          running" in info

    wait_for(repaired, 30, "the domain to be running and defined again")
    later = fleet.wait_vm(
        ns,
        "drift",
        lambda v: running(v) and v["status"]["startedAt"] > vm["status"]["startedAt"],
        "restarted",
        30,
    )
    assert later["status"]["domainUUID"] in fleet.virsh("domuuid", domain)

    # A domain of ours whose VM does not exist is removed: its metadata names a VM and its
    # files lie in this agent's directories.
    orphan = f"{ns}_ghost"
    console = fleet.node_dir(QEMU_NODE) / "run" / ns / "ghost" / "console.log"
    xml = (
        f"<domain type='qemu'><name>{orphan}</name><memory unit='MiB'>32</memory>"
        "<metadata><vmm:owner xmlns:vmm='https://vmm.formation.cloud/domain'>"
        f"<vmm:namespace>{ns}</vmm:namespace><vmm:name>ghost</vmm:name><vmm:uid>{uuid.uuid4()}</vmm:uid>"
        "</vmm:owner></metadata><os><type arch='x86_64'>hvm</type></os></domain>"
    )
    serial = "<devices><serial type='file'><source path='{}'/></serial></devices>"
    xml_path = fleet.plane.root / "ghost.xml"
    xml_path.write_text(xml.replace("</os>", "</os>" + serial.format(console)))
    assert "defined" in fleet.virsh("define", str(xml_path))
    # One just like it whose files lie elsewhere: another agent's (or cluster's) on a shared
    # libvirtd. Not ours to remove.
    stranger = xml.replace(orphan, f"{ns}_stranger").replace(
        "</os>", "</os>" + serial.format(fleet.plane.root / "elsewhere" / "console.log")
    )
    xml_path.write_text(stranger)
    assert "defined" in fleet.virsh("define", str(xml_path))
    wait_for(
        lambda: orphan not in fleet.virsh("list", "--all", "--name"), 30, "the orphan domain to be removed"
    )
    agent = fleet.agents[QEMU_NODE]
    fleet.wait_metric_above(agent, "vmm_agent_resyncs_total", fleet.metrics(agent)["vmm_agent_resyncs_total"])
    assert f"{ns}_stranger" in fleet.virsh("list", "--all", "--name")
    fleet.virsh("undefine", f"{ns}_stranger")


def test_deletion_and_node_loss_while_the_agent_is_down(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "doomed", disks=[{"name": "data", "size": "16Mi"}], **ON_QEMU)
    fleet.apply_vm(ns, "survivor", **ON_QEMU)
    fleet.wait_phase(ns, "doomed", "Running", 90)
    fleet.wait_phase(ns, "survivor", "Running", 90)
    disk_dir = fleet.vm_disk(QEMU_NODE, ns, "doomed", "data").parent
    assert disk_dir.exists()
    agent = fleet.agents[QEMU_NODE]
    agent.kill()
    try:
        fleet.kubectl("delete", "vm", "doomed", "-n", ns, "--wait=false")
        vm = fleet.wait_phase(ns, "survivor", "Unknown", 30)  # the controller notices the silence
        assert condition(vm, "Ready") == {**condition(vm, "Ready"), "status": "Unknown", "reason": "NodeLost"}
        assert fleet.vm(ns, "doomed")["metadata"]["deletionTimestamp"]
        assert f"{ns}_doomed" in fleet.virsh("list", "--name")  # nobody removed it while the agent was away
    finally:
        agent.restart(fleet.plane)
    agent.wait_ready()
    fleet.wait_gone("vm", ns, "doomed")
    assert f"{ns}_doomed" not in fleet.virsh("list", "--all", "--name")
    assert not disk_dir.exists()
    fleet.wait_phase(ns, "survivor", "Running", 30)


def test_controller_killed_mid_placement_binds_each_vm_once(fleet: Fleet, ns: str) -> None:
    names = [f"m-{i}" for i in range(8)]
    for name in names:
        fleet.apply_vm(ns, name, **TINY)
    fleet.controller.kill()  # while it is binding them
    fleet.controller.restart(fleet.plane)
    fleet.controller.wait_ready()
    vms = {name: fleet.wait_phase(ns, name, "Running", 90) for name in names}
    for vm in vms.values():
        assert vm["metadata"]["labels"][NODE_LABEL] == vm["status"]["nodeName"]
    placed: dict[str, list[str]] = {}
    for node in ("node-a", "node-b"):
        placed[node] = [d["name"] for d in fleet.agent_vms(node) if d["namespace"] == ns]
        assert len(placed[node]) <= 4  # capacity held through the restart
    assert sorted(placed["node-a"] + placed["node-b"]) == sorted(names)  # each exactly once
    for name, vm in vms.items():
        assert name in placed[vm["status"]["nodeName"]]


def test_deleting_a_vm_asks_its_guest_first_and_stops_it_hard_after_the_grace_period(
    fleet: Fleet, ns: str
) -> None:
    # A blank disk: the guest sits in the firmware, which ignores ACPI, so the grace period runs out.
    fleet.apply_vm(
        ns, "slow", disks=[{"name": "d", "size": "1Mi"}], **{**ON_QEMU, "terminationGracePeriodSeconds": 6}
    )
    fleet.wait_phase(ns, "slow", "Running", 90)
    agent = fleet.agents[QEMU_NODE]
    before = fleet.metrics(agent)
    fleet.kubectl("delete", "vm", "slow", "-n", ns, "--wait=false")
    vm = fleet.wait_phase(ns, "slow", "Terminating", 30)
    assert vm["metadata"]["deletionTimestamp"]
    # ACPI was asked for, and the guest is still running: not destroyed at once.
    after = fleet.metrics(agent)
    assert after['vmm_agent_actions_total{action="shutdown"}'] > before.get(
        'vmm_agent_actions_total{action="shutdown"}', 0
    )
    assert f"{ns}_slow" in fleet.virsh("list", "--name")
    fleet.wait_gone("vm", ns, "slow", 60)
    assert f"{ns}_slow" not in fleet.virsh("list", "--all", "--name")
    final = fleet.metrics(agent)
    assert final['vmm_agent_actions_total{action="destroy"}'] > after.get(
        'vmm_agent_actions_total{action="destroy"}', 0
    )


def test_a_guest_taking_its_grace_period_blocks_no_other_sync(fleet: Fleet, ns: str) -> None:
    """node-q's agent syncs with a single worker thread: a stop that waited out its grace period
    in that thread would hold every other VM of the node for as long."""
    stubborn = {**ON_QEMU, "terminationGracePeriodSeconds": 300}
    fleet.apply_vm(ns, "stubborn", disks=[{"name": "d", "size": "1Mi"}], **stubborn)
    fleet.apply_vm(ns, "other", **ON_QEMU)
    fleet.wait_phase(ns, "stubborn", "Running", 90)
    fleet.wait_phase(ns, "other", "Running", 90)
    assert fleet.plugin("-n", ns, "stop", "stubborn", "--no-wait").returncode == 0
    fleet.wait_phase(ns, "stubborn", "Stopping", 30)
    # The other VM is served at once, while the first still has minutes of grace left.
    for verb, phase in (("pause", "Paused"), ("resume", "Running")):
        out = fleet.plugin("-n", ns, verb, "other", "--timeout", "30")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"virtualmachine {ns}/other is {phase}"
    assert fleet.vm(ns, "stubborn")["status"]["phase"] == "Stopping"
    assert f"{ns}_stubborn" in fleet.virsh("list", "--name")
    # A shorter grace period takes effect at the next look: stopped hard now.
    fleet.kubectl(
        "patch",
        "vm",
        "stubborn",
        "-n",
        ns,
        "--type=merge",
        "-p",
        '{"spec": {"terminationGracePeriodSeconds": 0}}',
    )
    fleet.wait_phase(ns, "stubborn", "Stopped", 30)
