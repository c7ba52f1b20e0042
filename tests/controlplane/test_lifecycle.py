"""VM lifecycle across a controller and three agents (see fleet.py): placement, the plugin's
verbs, restarts, crashes per runStrategy, drift, node loss, deletion while an agent is down, a
controller killed mid-placement."""

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from formation_vmm.api.names import NODE_LABEL
from tests.controlplane.fleet import QEMU_NODE, QEMU_TOLERATION, Fleet, condition
from tests.controlplane.helpers import wait_for

pytestmark = pytest.mark.controlplane

TINY = {"cpus": 1, "memory": "64Mi"}
ON_QEMU = {
    **TINY,
    "nodeSelector": {"zone": "q"},
    "tolerations": [QEMU_TOLERATION],
    "terminationGracePeriodSeconds": 0,
}


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True, check=False
    ).stdout


def qemu_pid(domain: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())


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
    assert iface["name"] == "eth0" and iface["mac"].startswith("52:54:00:")
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
    os.kill(qemu_pid(f"{ns}_crashy"), signal.SIGKILL)  # QEMU dies: a crash
    if restarted:
        vm = fleet.wait_vm(
            ns, "crashy", lambda v: v["status"].get("restartCount", 0) >= 1 and running(v), "restarted", 30
        )
        assert vm["status"]["startedAt"] >= first["status"]["startedAt"]
        events = fleet.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=crashy")
        assert "Restarted" in events
    else:
        vm = fleet.wait_phase(ns, "crashy", "Failed", 30)
        time.sleep(3)  # a resync later, it is still not restarted
        vm = fleet.vm(ns, "crashy")
        assert vm["status"]["phase"] == "Failed"
        assert vm["status"].get("restartCount", 0) == 0


def test_drift_is_repaired(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "drift", **ON_QEMU)
    vm = fleet.wait_phase(ns, "drift", "Running", 90)
    domain = f"{ns}_drift"
    virsh("destroy", domain)  # stopped behind the agent's back: started again (Always)
    virsh("undefine", domain)  # and its definition removed: defined again

    def repaired() -> bool:
        info = virsh("dominfo", domain)
        return "Persistent:     yes" in info and "State:          running" in info

    wait_for(repaired, 30, "the domain to be running and defined again")
    later = fleet.wait_vm(
        ns,
        "drift",
        lambda v: running(v) and v["status"]["startedAt"] > vm["status"]["startedAt"],
        "restarted",
        30,
    )
    assert later["status"]["domainUUID"] in virsh("domuuid", domain)

    # A domain of ours whose VM does not exist is removed.
    orphan = f"{ns}_ghost"
    xml = (
        f"<domain type='qemu'><name>{orphan}</name><memory unit='MiB'>32</memory>"
        "<metadata><vmm:owner xmlns:vmm='https://vmm.formation.cloud/domain'>"
        f"<vmm:namespace>{ns}</vmm:namespace><vmm:name>ghost</vmm:name><vmm:uid>{uuid.uuid4()}</vmm:uid>"
        "</vmm:owner></metadata><os><type arch='x86_64'>hvm</type></os></domain>"
    )
    xml_path = fleet.plane.root / "ghost.xml"
    xml_path.write_text(xml)
    virsh("define", str(xml_path))
    assert orphan in virsh("list", "--all", "--name")
    wait_for(lambda: orphan not in virsh("list", "--all", "--name"), 30, "the orphan domain to be removed")


def test_deletion_and_node_loss_while_the_agent_is_down(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "doomed", disks=[{"name": "data", "size": "16Mi"}], **ON_QEMU)
    fleet.apply_vm(ns, "survivor", **ON_QEMU)
    fleet.wait_phase(ns, "doomed", "Running", 90)
    fleet.wait_phase(ns, "survivor", "Running", 90)
    disk_dir = fleet.plane.root / "nodes" / QEMU_NODE / "disks" / ns / "doomed"
    assert disk_dir.exists()
    agent = fleet.agents[QEMU_NODE]
    agent.kill()
    try:
        fleet.kubectl("delete", "vm", "doomed", "-n", ns, "--wait=false")
        vm = fleet.wait_phase(ns, "survivor", "Unknown", 30)  # the controller notices the silence
        assert condition(vm, "Ready") == {**condition(vm, "Ready"), "status": "Unknown", "reason": "NodeLost"}
        assert fleet.vm(ns, "doomed")["metadata"]["deletionTimestamp"]
        assert f"{ns}_doomed" in virsh("list", "--name")  # nobody removed it while the agent was away
    finally:
        agent.restart(fleet.plane)
    agent.wait_ready()
    wait_for(
        lambda: fleet.kubectl.run("get", "vm", "doomed", "-n", ns).returncode != 0, 60, "doomed to be gone"
    )
    assert f"{ns}_doomed" not in virsh("list", "--all", "--name")
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
