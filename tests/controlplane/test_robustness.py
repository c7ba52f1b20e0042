"""What a node goes through, done for real: its libvirtd killed and restarted, or hung; a second
agent started on it; the apiserver restarted while a VM is deleted behind the agent's back; the
agent killed in the middle of a restore. The guests and the truth of the status survive."""

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from formation_vmm.devcluster.cluster import start_agent
from formation_vmm.devcluster.processes import alive, stop
from tests.support.fleet import FAST, ON_QEMU, QEMU_NODE, TINY, Fleet, condition
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane


def ready(vm: dict[str, Any]) -> tuple[str, str]:
    cond = condition(vm, "Ready")
    return cond.get("status", ""), cond.get("reason", "")


def test_a_libvirtd_restart_leaves_phases_alone_and_guests_running(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "steady", disks=[{"name": "d", "size": "1Mi"}], **ON_QEMU)
    fleet.wait_phase(ns, "steady", "Running", 90)
    guest = fleet.qemu_pid(f"{ns}_steady")
    fleet.qemu.kill_daemon()
    try:
        vm = fleet.wait_vm(
            ns, "steady", lambda v: ready(v)[1] == "HypervisorUnavailable", "Ready=Unknown", 60
        )
        assert vm["status"]["phase"] == "Running"  # kept: nothing is known to have changed
        assert ready(vm) == ("Unknown", "HypervisorUnavailable")
        assert alive(guest)
    finally:
        fleet.qemu.start()
    vm = fleet.wait_vm(ns, "steady", lambda v: ready(v) == ("True", "Running"), "Ready again", 60)
    assert fleet.qemu_pid(f"{ns}_steady") == guest  # the same QEMU: not restarted
    assert vm["status"].get("restartCount", 0) == 0


def test_a_hung_libvirtd_blocks_neither_probes_nor_heartbeats(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "waiting", **ON_QEMU)
    fleet.wait_phase(ns, "waiting", "Running", 90)
    agent = fleet.agents[QEMU_NODE]
    daemon = fleet.qemu.pid()
    assert daemon is not None
    beats = fleet.metrics(agent)["vmm_agent_heartbeats_total"]
    os.kill(daemon, signal.SIGSTOP)
    try:
        readyz = f"http://127.0.0.1:{agent.port}/readyz"

        def not_ready() -> str:
            proc = subprocess.run(
                ["curl", "-s", "--max-time", "5", readyz], capture_output=True, text=True, check=False
            )
            return proc.stdout if "libvirt" in proc.stdout and "not ready" in proc.stdout else ""

        answer = wait_for(not_ready, 30, "/readyz to say libvirt does not answer")
        assert "no answer within 2s" in answer or "libvirt" in answer
        fleet.wait_metric_above(agent, "vmm_agent_heartbeats_total", beats + 2, 30)  # the node lives on
        vm = fleet.wait_vm(
            ns, "waiting", lambda v: ready(v)[1] == "HypervisorUnavailable", "Ready=Unknown", 90
        )
        assert vm["status"]["phase"] == "Running"
        assert fleet.vm(ns, "waiting")["status"]["phase"] != "Unknown"  # not a lost node
    finally:
        os.kill(daemon, signal.SIGCONT)
    fleet.wait_vm(ns, "waiting", lambda v: ready(v) == ("True", "Running"), "Ready again", 90)


def test_a_second_agent_on_a_node_refuses_to_run(fleet: Fleet) -> None:
    second = start_agent(fleet.plane, "node-a", "test:///default", "test", FAST)
    try:
        wait_for(lambda: not alive(second.pid), 30, "the second agent to exit")
        assert "another agent runs on node node-a" in second.log.read_text()
    finally:
        stop(second.pid)
        fleet.plane.processes.add("agent-node-a", fleet.agents["node-a"].pid)  # the real one's entry
    assert alive(fleet.agents["node-a"].pid)


def test_a_vm_deleted_while_the_watch_was_down_does_not_keep_running(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "forgotten", **ON_QEMU)
    vm = fleet.wait_phase(ns, "forgotten", "Running", 90)
    agent = fleet.agents[QEMU_NODE]
    os.kill(agent.pid, signal.SIGSTOP)  # its watch hears nothing ...
    try:
        # ... while the VM is deleted with its finalizer torn off (as an admin would), and the
        # apiserver restarts: the agent's watch breaks, and its re-list shows no deletion.
        fleet.kubectl(
            "patch", "vm", "forgotten", "-n", ns, "--type=merge", "-p", '{"metadata": {"finalizers": null}}'
        )
        fleet.kubectl("delete", "vm", "forgotten", "-n", ns, "--wait=true")
        fleet.plane.restart_apiserver()
        # Still running: checked while the agent is stopped, since once it goes on it may
        # remove the domain before any check after it (seen in a full run).
        domain = f"{ns}_forgotten"
        assert domain in fleet.virsh("list", "--name")
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    wait_for(
        lambda: domain not in fleet.virsh("list", "--all", "--name"), 60, "the forgotten VM's domain to go"
    )
    fleet.wait_binding_again()
    assert vm["metadata"]["uid"] not in json.dumps(fleet.agent_vms(QEMU_NODE))


@pytest.mark.parametrize(("stage", "reverted"), [("reverted", False), ("reverting", True)])
def test_a_restore_cut_short_by_a_crash_is_finished_once(
    fleet: Fleet, ns: str, stage: str, reverted: bool
) -> None:
    """The agent died in a restore: after the revert (marker 'reverted'), it must not revert
    again (the guest's writes since would be lost); before it ('reverting'), it reverts. The
    dead agent's state is made here, as it would have left it: the moment of death cannot be
    chosen from outside."""
    fleet.apply_vm(ns, "db", nodeSelector={"zone": "a"}, disks=[{"name": "data", "size": "16Mi"}], **TINY)
    vm = fleet.wait_phase(ns, "db", "Running")
    data = fleet.vm_disk("node-a", ns, "db", "data")
    write = ["qemu-io", "-f", "qcow2", "-c"]
    subprocess.run([*write, "write -P 0x11 0 64k", str(data)], check=True, capture_output=True)
    snap = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VmSnapshot",
        "metadata": {"name": "s", "namespace": ns},
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump({**snap, "spec": {"vmName": "db"}}))
    wait_for(
        lambda: get_json(fleet.kubectl, "vmsnap", "s", "-n", ns).get("status", {}).get("phase") == "Ready",
        60,
        "s",
    )
    subprocess.run([*write, "write -P 0x22 0 64k", str(data)], check=True, capture_output=True)

    agent = fleet.agents["node-a"]
    agent.kill()
    restore = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VmRestore",
        "metadata": {"name": "r", "namespace": ns, "labels": {"vmm.formation.cloud/node": "node-a"}},
        "spec": {"vmName": "db", "snapshotName": "s"},
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(restore))
    body = get_json(fleet.kubectl, "vmrestore", "r", "-n", ns)
    fleet.kubectl(
        "patch",
        "vmrestore",
        "r",
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "InProgress"}}',
    )
    marker = data.parent / "restore.json"
    marker.write_text(json.dumps({"restore": body["metadata"]["uid"], "stage": stage}))
    agent.restart(fleet.plane)
    agent.wait_ready()
    wait_for(
        lambda: (
            get_json(fleet.kubectl, "vmrestore", "r", "-n", ns).get("status", {}).get("phase") == "Succeeded"
        ),
        60,
        "the restore to be finished",
    )
    pattern = 0x11 if reverted else 0x22
    check = subprocess.run(
        [*write, f"read -P {pattern} 0 64k", str(data)], capture_output=True, text=True, check=False
    )
    assert "Pattern verification failed" not in check.stdout, check.stdout
    assert not marker.exists()
    fleet.wait_phase(ns, "db", "Running")
    assert fleet.vm(ns, "db")["metadata"]["uid"] == vm["metadata"]["uid"]


def test_an_agent_started_before_its_libvirtd_checks_it_once_it_answers(fleet: Fleet, tmp_path: Path) -> None:
    """As with the chart's libvirtd, whose pod may start after the agent's: the agent waits
    for libvirt, then checks it and stops, saying why. The socket appears later as a link to
    our private libvirtd's (which runs QEMU as root with DAC only)."""
    late = tmp_path / "libvirt-sock"
    agent = start_agent(fleet.plane, "node-late", f"qemu+unix:///system?socket={late}", "qemu", FAST)
    try:
        wait_for(lambda: "cannot check how libvirt confines QEMU yet" in agent.log.read_text(), 30,
                 "the agent to wait for libvirt")  # fmt: skip
        assert alive(agent.pid)
        late.symlink_to(fleet.qemu.sock_dir / "libvirt-sock")
        wait_for(lambda: not alive(agent.pid), 30, "the agent to refuse")
        log = agent.log.read_text()
        assert "confines QEMU with DAC only and runs it as root" in log
        assert "VMM_ALLOW_UNCONFINED_QEMU=true allows it, for development only); stopping" in log
    finally:
        stop(agent.pid)
        fleet.plane.processes.forget(agent.name)  # exited on purpose: not the plane's to wait for


def test_an_agent_refuses_a_libvirt_that_runs_qemu_unconfined(fleet: Fleet) -> None:
    """Our private libvirtd runs QEMU as root with DAC only: an agent not told to allow it
    stops at start, saying why (the fleet's own node-q agent is allowed, as dev clusters are)."""
    agent = start_agent(fleet.plane, "node-unconfined", fleet.qemu.uri, "qemu", FAST)
    try:
        wait_for(lambda: not alive(agent.pid), 30, "the agent to refuse")
        log = agent.log.read_text()
        assert "confines QEMU with DAC only and runs it as root" in log
        assert "VMM_ALLOW_UNCONFINED_QEMU" in log
    finally:
        stop(agent.pid)
        fleet.plane.processes.forget(agent.name)  # exited on purpose: not the plane's to wait for
