"""A controller and three agents against the real control plane, as in a small cluster.

node-a and node-b run on libvirt's test driver (each agent process its own hypervisor), offering
4 vCPUs each. node-q runs real QEMU (TCG) through libvirtd, and is tainted so that only VMs that
tolerate `dedicated=qemu` land there. Every process authenticates as its own service account.
"""

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

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

TEST_NODES = {"node-a": "a", "node-b": "b"}
QEMU_NODE = "node-q"
QEMU_TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "qemu", "effect": "NoSchedule"}
# libvirt's test driver reports 16 CPUs; keeping 12 back leaves 4 for VMs on each test node.
TEST_NODE_RESERVED_CPUS = 12


@dataclass
class Fleet:
    plane: ControlPlane
    kubectl: Kubectl
    controller: OperatorProcess
    agents: dict[str, OperatorProcess]

    def apply_vm(self, namespace: str, name: str, **spec: Any) -> None:
        doc = {
            "apiVersion": "vmm.formation.cloud/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        self.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))

    def vm(self, namespace: str, name: str) -> dict[str, Any]:
        return get_json(self.kubectl, "vm", name, "-n", namespace)

    def wait_vm(
        self, namespace: str, name: str, check: Any, what: str, timeout: float = 60
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            vm = self.vm(namespace, name)
            return vm if check(vm) else None

        return wait_for(probe, timeout, f"{namespace}/{name} {what}")  # type: ignore[no-any-return]

    def wait_phase(self, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_vm(
            namespace, name, lambda vm: vm.get("status", {}).get("phase") == phase, f"phase {phase}", timeout
        )

    def agent_get(self, node: str, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.agents[node].port}{path}", timeout=5) as resp:
            return json.load(resp)

    def agent_vms(self, node: str) -> list[dict[str, Any]]:
        return list(self.agent_get(node, "/vms"))

    def plugin(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "formation_vmm.plugin", f"--kubeconfig={self.plane.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def images_dir(self, node: str) -> Path:
        return self.plane.root / "nodes" / node / "images"


def condition(vm: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in vm.get("status", {}).get("conditions", []) if c["type"] == type_), {})


@pytest.fixture(scope="module")
def fleet(control_plane: ControlPlane, kubectl: Kubectl) -> Iterator[Fleet]:
    install_rbac(kubectl)
    for node, zone in TEST_NODES.items():
        register_node(kubectl, node, {"zone": zone})
    register_node(kubectl, QEMU_NODE, {"zone": "q"})
    kubectl("taint", "node", QEMU_NODE, "dedicated=qemu:NoSchedule", "--overwrite")
    controller_config = service_account_kubeconfig(kubectl, control_plane, "formation-vmm-controller")
    agent_config = service_account_kubeconfig(kubectl, control_plane, "formation-vmm-agent")
    fast = {
        "VMM_HEARTBEAT_SECONDS": "1",
        "VMM_RESYNC_SECONDS": "2",
        "VMM_IMAGE_PROGRESS_SECONDS": "0.5",
        "VMM_IMAGE_RETRY_SECONDS": "3",
        "VMM_IMAGE_GC_GRACE_SECONDS": "3",
        "VMM_IMAGE_GC_INTERVAL_SECONDS": "1",
    }
    controller = start_controller(control_plane, {"VMM_NODE_LOST_SECONDS": "6"}, kubeconfig=controller_config)
    agents = {
        node: start_agent(
            control_plane,
            node,
            "test:///default",
            "test",
            {**fast, "VMM_RESERVED_CPUS": str(TEST_NODE_RESERVED_CPUS)},
            kubeconfig=agent_config,
        )
        for node in TEST_NODES
    }
    agents[QEMU_NODE] = start_agent(
        control_plane, QEMU_NODE, "qemu:///system", "qemu", fast, kubeconfig=agent_config
    )
    fleet = Fleet(control_plane, kubectl, controller, agents)
    try:
        for proc in [controller, *agents.values()]:
            proc.wait_ready()
        yield fleet
    finally:
        # While the agents still run, so that they remove their domains (real ones on node-q).
        kubectl("delete", "vm", "--all", "-A", "--wait=true", "--timeout=90s", check=False)
        for proc in [controller, *agents.values()]:
            stop(proc.pid)
        for node in [*TEST_NODES, QEMU_NODE]:
            kubectl("delete", "node", node, check=False)
