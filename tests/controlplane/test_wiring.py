"""The controller and an agent wired end to end against the real control plane (the fleet's
node-a, on its own test:/// hypervisor): apply a VM, see it placed, started and reported in
`kubectl get` and `kubectl describe`; delete it, see the domain gone."""

import urllib.error
import urllib.request

import pytest
import yaml

from formation_vmm.api.names import NODE_LABEL, agent_finalizer
from tests.support.fleet import Fleet, condition
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


def parse_table(text: str) -> list[list[str]]:
    """kubectl's table output cut at the header's column starts (an empty cell stays empty)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = [*starts[1:], None]
    return [[line[a:b].strip() for a, b in zip(starts, bounds, strict=True)] for line in lines]


def test_apply_place_run_delete(fleet: Fleet, ns: str) -> None:
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "wired", "namespace": ns},
        "spec": {
            "cpus": 2,
            "memory": "256Mi",
            "nodeSelector": {"zone": "a"},
            "disks": [{"name": "data", "size": "16Mi"}],
        },
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))
    vm = fleet.wait_phase(ns, "wired", "Running")
    status = vm["status"]
    assert status["nodeName"] == "node-a"
    assert vm["metadata"]["labels"][NODE_LABEL] == "node-a"
    assert vm["metadata"]["finalizers"] == [agent_finalizer("node-a")]
    assert (condition(vm, "Scheduled")["status"], condition(vm, "Scheduled")["reason"]) == (
        "True",
        "Scheduled",
    )
    assert condition(vm, "Ready")["status"] == "True"
    assert status["vcpus"] == 2 and status["observedGeneration"] == 1 and status["startedAt"]
    domains = fleet.agent_vms("node-a")
    assert [(d["id"], d["state"], d["uuid"]) for d in domains if d["namespace"] == ns] == [
        (vm["metadata"]["uid"], "running", status["domainUUID"])
    ]

    header, row = parse_table(fleet.kubectl("get", "vm", "wired", "-n", ns))[:2]
    assert header == ["NAME", "PHASE", "NODE", "IP", "CPUS", "MEMORY", "READY", "AGE"]
    assert row[:7] == ["wired", "Running", "node-a", "", "2", "256Mi", "True"]

    described = fleet.kubectl("describe", "vm", "wired", "-n", ns)
    assert "bound to node node-a" in described  # the Scheduled condition's message

    # The node says what it offers and holds; the agent answers the old service's endpoints.
    def node_annotations() -> str:
        return fleet.kubectl("get", "node", "node-a", "-o", "jsonpath={.metadata.annotations}")

    wait_for(lambda: '"vmm.formation.cloud/vms":"1"' in node_annotations(), 10, "the next heartbeat")
    assert '"vmm.formation.cloud/capacity-cpus":"4"' in node_annotations()

    def health() -> dict | None:  # type: ignore[type-arg]
        try:
            return dict(fleet.agent_get("node-a", "/health"))
        except urllib.error.HTTPError:  # 503 while a check lags: a 1 s heartbeat late on a busy machine
            return None

    assert wait_for(health, 30, "the agent's /health to say ok")["status"] == "ok"
    assert fleet.agent_get("node-a", f"/vms/{vm['metadata']['uid']}")["name"] == "wired"
    assert isinstance(fleet.agent_get("node-a", "/images"), list)
    agent_metrics = fleet.scrape(fleet.agents["node-a"])
    assert 'vmm_agent_actions_total{action="start"}' in agent_metrics
    assert "vmm_agent_sync_seconds_count" in agent_metrics
    assert 'vmm_controller_bindings_total{result="bound"}' in fleet.scrape(fleet.controller)

    fleet.kubectl("delete", "vm", "wired", "-n", ns, "--timeout=60s")
    assert [d for d in fleet.agent_vms("node-a") if d["namespace"] == ns] == []


def test_no_hypervisor_fits_stays_pending_with_the_reason(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "nowhere", nodeSelector={"zone": "mars"})
    vm = fleet.wait_vm(
        ns, "nowhere", lambda v: condition(v, "Scheduled").get("reason") == "Unschedulable", "refused"
    )
    assert condition(vm, "Scheduled")["status"] == "False"
    assert (
        condition(vm, "Scheduled")["message"]
        == "0/3 hypervisor nodes can take the VM: 3 do not match the nodeSelector"
    )
    assert vm["status"]["phase"] == "Pending"
    described = fleet.kubectl("describe", "vm", "nowhere", "-n", ns)
    assert "Unschedulable" in described
