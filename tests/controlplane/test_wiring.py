"""The controller and one agent wired end to end against the real control plane; the agent on
its own test:/// hypervisor. Apply a VM, see it placed, started and reported; delete it, see the
domain gone."""

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from formation_vmm.api.names import NODE_LABEL
from formation_vmm.devcluster.cluster import (
    Kubectl,
    OperatorProcess,
    install_rbac,
    register_node,
    service_account_kubeconfig,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.processes import stop
from tests.controlplane.helpers import get_json, wait_for

pytestmark = pytest.mark.controlplane

NODE = "wiring-node"


@pytest.fixture(scope="module")
def operators(control_plane: ControlPlane, kubectl: Kubectl) -> Iterator[dict[str, OperatorProcess]]:
    register_node(kubectl, NODE)
    # Each process authenticates as its own service account: the RBAC of manifests/ is what
    # lets them work here, so a missing rule fails these tests.
    install_rbac(kubectl)
    procs = {
        "controller": start_controller(
            control_plane,
            kubeconfig=service_account_kubeconfig(kubectl, control_plane, "formation-vmm-controller"),
        ),
        "agent": start_agent(
            control_plane,
            NODE,
            "test:///default",
            "test",
            kubeconfig=service_account_kubeconfig(kubectl, control_plane, "formation-vmm-agent"),
        ),
    }
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            stop(proc.pid)
        kubectl("delete", "node", NODE, check=False)


def parse_table(text: str) -> list[list[str]]:
    """kubectl's table output cut at the header's column starts (an empty cell stays empty)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = [*starts[1:], None]
    return [[line[a:b].strip() for a, b in zip(starts, bounds, strict=True)] for line in lines]


def agent_vms(agent: OperatorProcess) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/vms", timeout=5) as resp:
        return list(json.load(resp))


def test_apply_place_run_delete(
    kubectl: Kubectl, namespace: str, operators: dict[str, OperatorProcess]
) -> None:
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "wired", "namespace": namespace},
        "spec": {"cpus": 2, "memory": "256Mi", "disks": [{"name": "data", "size": "16Mi"}]},
    }
    kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))

    def running() -> dict[str, Any] | None:
        vm = get_json(kubectl, "vm", "wired", "-n", namespace)
        return vm if vm.get("status", {}).get("phase") == "Running" else None

    vm = wait_for(running, 60, "the VM to be Running")
    status = vm["status"]
    assert status["nodeName"] == NODE
    assert vm["metadata"]["labels"][NODE_LABEL] == NODE
    scheduled = next(c for c in status["conditions"] if c["type"] == "Scheduled")
    assert (scheduled["status"], scheduled["reason"]) == ("True", "Scheduled")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    assert status["vcpus"] == 2
    domains = agent_vms(operators["agent"])
    assert [(d["id"], d["state"], d["uuid"]) for d in domains] == [
        (vm["metadata"]["uid"], "running", status["domainUUID"])
    ]

    header, row = parse_table(kubectl("get", "vm", "wired", "-n", namespace))[:2]
    assert header == ["NAME", "PHASE", "NODE", "IP", "CPUS", "MEMORY", "READY", "AGE"]
    assert row[:7] == ["wired", "Running", NODE, "", "2", "256Mi", "True"]

    events = kubectl("get", "events", "-n", namespace, "--field-selector", "involvedObject.name=wired")
    assert "Scheduled" in events and "Running" in events

    kubectl("delete", "vm", "wired", "-n", namespace, "--timeout=60s")
    assert agent_vms(operators["agent"]) == []


def test_no_hypervisor_fits_stays_pending_with_the_reason(
    kubectl: Kubectl, namespace: str, operators: dict[str, OperatorProcess]
) -> None:
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "nowhere", "namespace": namespace},
        "spec": {"nodeSelector": {"zone": "mars"}},
    }
    kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))

    def unschedulable() -> dict[str, Any] | None:
        status = get_json(kubectl, "vm", "nowhere", "-n", namespace).get("status", {})
        cond = next((c for c in status.get("conditions", []) if c["type"] == "Scheduled"), None)
        return cond if cond and cond["reason"] == "Unschedulable" else None

    cond = wait_for(unschedulable, 30, "Scheduled=False/Unschedulable")
    assert cond["status"] == "False"
    assert "do not match the nodeSelector" in cond["message"]
    assert get_json(kubectl, "vm", "nowhere", "-n", namespace)["status"]["phase"] == "Pending"
