"""A controller and three agents against the real control plane, as in a small cluster, shared
by every control-plane test of a run (each test works in a namespace of its own).

node-a and node-b run on libvirt's test driver (each agent process its own hypervisor), offering
4 vCPUs each. node-q runs real QEMU (TCG) on a libvirtd of its own (``support.nodes``), and is
tainted so that only VMs that tolerate `dedicated=qemu` land there. Every process authenticates
as its own service account, with a bound token, so the RBAC we ship is what the tests run with.
"""

import json
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from formation_vmm.devcluster.cluster import (
    TEST_DRIVER_ALLOCATABLE,
    Kubectl,
    OperatorProcess,
    install_rbac,
    register_node,
    service_account_kubeconfig,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.processes import stop
from tests.support.scraper import scrape, scraper_token
from tests.support.waiting import get_json, get_json_or_none, wait_for

TEST_NODES = {"node-a": "a", "node-b": "b"}
QEMU_NODE = "node-q"
QEMU_TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "qemu", "effect": "NoSchedule"}
# libvirt's test driver reports 16 CPUs; keeping 12 back leaves 4 for VMs on each test node.
TEST_NODE_RESERVED_CPUS = 12

TINY = {"cpus": 1, "memory": "64Mi"}
ON_QEMU = {
    **TINY,
    "nodeSelector": {"zone": "q"},
    "tolerations": [QEMU_TOLERATION],
    "terminationGracePeriodSeconds": 0,
}
# Settings that make the agents look often, so tests wait seconds, not minutes.
FAST = {
    "VMM_HEARTBEAT_SECONDS": "1",
    "VMM_RESYNC_SECONDS": "2",
    "VMM_RETRY_SECONDS": "2",
    "VMM_IMAGE_PROGRESS_SECONDS": "0.5",
    "VMM_IMAGE_RETRY_SECONDS": "3",
    "VMM_IMAGE_GC_GRACE_SECONDS": "3",
    "VMM_IMAGE_GC_INTERVAL_SECONDS": "1",
    # Exactly the loopback address the tests serve images from; everything else stays refused.
    "VMM_IMAGE_EGRESS_ALLOW": "127.0.0.1/32",
    # A followed console's responses end this often (45 s, under the apiserver's 60, by default):
    # the console tests see the plugin go on across them.
    "VMM_CONSOLE_SEGMENT_SECONDS": "2",
}
_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


@dataclass
class Fleet:
    plane: ControlPlane
    kubectl: Kubectl
    controller: OperatorProcess
    agents: dict[str, OperatorProcess]
    qemu: LibvirtNode
    _scraper_token: str | None = None

    def apply(self, doc: dict[str, Any]) -> None:
        self.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))

    def apply_vm(self, namespace: str, name: str, **spec: Any) -> None:
        self.apply(
            {
                "apiVersion": "vmm.formation.cloud/v1alpha1",
                "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": namespace},
                "spec": spec,
            }
        )

    def vm(self, namespace: str, name: str) -> dict[str, Any]:
        return get_json(self.kubectl, "vm", name, "-n", namespace)

    def vm_or_none(self, namespace: str, name: str) -> dict[str, Any] | None:
        return get_json_or_none(self.kubectl, "vm", name, "-n", namespace)

    def wait_vm(
        self,
        namespace: str,
        name: str,
        check: Callable[[dict[str, Any]], Any],
        what: str,
        timeout: float = 60,
    ) -> dict[str, Any]:
        seen: list[dict[str, Any] | None] = [None]

        def probe() -> dict[str, Any] | None:
            vm = seen[0] = self.vm_or_none(namespace, name)
            return vm if vm is not None and check(vm) else None

        try:
            return wait_for(probe, timeout, f"{namespace}/{name} {what}")  # type: ignore[no-any-return]
        except AssertionError as exc:
            # Say where the VM was, not only that it was not there yet (a VM left Pending by a
            # full node and one its agent never synced fail alike otherwise).
            raise AssertionError(f"{exc}; the VM was: {_where(seen[0])}") from None

    def restart_apiserver(self, down_seconds: float = 0.0) -> None:
        """Restart kube-apiserver, then wait until the controller binds a VM again: every watch
        and connection of the fleet broke, and the next test must not inherit a fleet still
        reconnecting (a VM applied right after a restart was once left unbound 60 s in CI)."""
        self.plane.restart_apiserver(down_seconds=down_seconds)
        self.wait_binding_again()

    def wait_binding_again(self, timeout: float = 120) -> None:
        """A stopped VM (nothing to start) bound by the controller, then deleted: proof that the
        controller's watches, lease and writes are all back."""
        name = f"canary-{uuid.uuid4().hex[:8]}"
        self.apply_vm("default", name, runStrategy="Halted", nodeSelector={"zone": "a"}, **TINY)
        try:
            self.wait_vm(
                "default",
                name,
                lambda vm: condition(vm, "Scheduled").get("status") == "True",
                "bound",
                timeout,
            )
        finally:
            self.kubectl("delete", "vm", name, "-n", "default", "--wait=true", "--timeout=60s", check=False)

    def wait_phase(self, namespace: str, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return self.wait_vm(
            namespace, name, lambda vm: vm.get("status", {}).get("phase") == phase, f"phase {phase}", timeout
        )

    def wait_gone(self, kind: str, namespace: str, name: str, timeout: float = 60) -> None:
        wait_for(
            lambda: get_json_or_none(self.kubectl, kind, name, "-n", namespace) is None,
            timeout,
            f"{kind} {namespace}/{name} to be gone",
        )

    def agent_get(self, node: str, path: str) -> Any:
        """``/health`` from the agent's public port; the rest from its node-local debug port."""
        agent = self.agents[node]
        base = agent.url if path.startswith("/health") else agent.debug_url
        with urllib.request.urlopen(f"{base}{path}", timeout=5) as resp:
            return json.load(resp)

    def user(self, namespace: str, name: str, cluster_role: str) -> Path:
        """A kubeconfig for a service account ``name`` of ``namespace`` (created if need be)
        bound there to Kubernetes' ``edit``, ``view`` or ``admin`` role, as a tenant would be:
        what it may do to our kinds comes from the roles we ship, aggregated."""
        if self.kubectl.run("get", "namespace", namespace).returncode != 0:
            self.kubectl("create", "namespace", namespace)
        self.kubectl.apply_docs(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": name, "namespace": namespace},
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": f"{name}-{cluster_role}", "namespace": namespace},
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "ClusterRole",
                        "name": cluster_role,
                    },
                    "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
                },
            ]
        )
        account = f"system:serviceaccount:{namespace}:{name}"
        wait_for(  # the aggregation controller folds our roles into Kubernetes' own
            lambda: (
                self.kubectl.run(
                    "auth",
                    "can-i",
                    "get",
                    "virtualmachines.vmm.formation.cloud",
                    "-n",
                    namespace,
                    f"--as={account}",
                ).returncode
                == 0
            ),
            30,
            f"{account} to be allowed what {cluster_role} grants",
        )
        return service_account_kubeconfig(self.kubectl, self.plane, name, namespace=namespace)

    def agent_vms(self, node: str) -> list[dict[str, Any]]:
        return list(self.agent_get(node, "/vms"))

    def scraper_token(self) -> str:
        """A token Prometheus could hold (tests/support/scraper.py), made once."""
        if self._scraper_token is None:
            self._scraper_token = scraper_token(self.kubectl)
        return self._scraper_token

    def scrape(self, process: OperatorProcess) -> str:
        """A process's /metrics, read as Prometheus does."""
        return scrape(f"http://127.0.0.1:{process.port}", self.scraper_token())

    def metrics(self, process: OperatorProcess) -> dict[str, float]:
        """A process's Prometheus samples, ``name{labels}`` -> value."""
        text = self.scrape(process)
        samples = {}
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match:
                key = match["name"] + (f"{{{match['labels']}}}" if match["labels"] else "")
                samples[key] = float(match["value"])
        return samples

    def wait_metric_above(
        self, process: OperatorProcess, name: str, value: float, timeout: float = 30
    ) -> None:
        """Wait until the process's counter ``name`` passes ``value``: proof it looked again."""
        wait_for(lambda: self.metrics(process).get(name, 0) > value, timeout, f"{name} above {value}")

    def plugin(
        self, *args: str, timeout: float = 120, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        config = kubeconfig or self.plane.kubeconfig
        return subprocess.run(
            [sys.executable, "-m", "formation_vmm.plugin", f"--kubeconfig={config}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def console(self, namespace: str, name: str) -> str:
        """What the guest printed so far; empty while its domain does not exist yet."""
        out = self.plugin("-n", namespace, "console", name, "--no-follow")
        if out.returncode != 0 and (
            "not bound to a node yet" in out.stderr or "has no domain on this node" in out.stderr
        ):
            return ""
        assert out.returncode == 0, out.stderr
        return out.stdout

    def node_dir(self, node: str) -> Path:
        return self.plane.root / "nodes" / node

    def images_dir(self, node: str) -> Path:
        return self.node_dir(node) / "images"

    def vm_disk(self, node: str, namespace: str, vm: str, disk: str) -> Path:
        uid = self.vm(namespace, vm)["metadata"]["uid"]
        return self.node_dir(node) / "disks" / namespace / vm / uid / f"{disk}.qcow2"

    def virsh(self, *args: str) -> str:
        """virsh on node-q's libvirtd."""
        return subprocess.run(
            ["virsh", "-c", self.qemu.uri, *args], capture_output=True, text=True, check=False
        ).stdout

    def qemu_netns(self, *argv: str) -> str:
        """A command run inside node-q's network namespace (where its guests' networks live)."""
        return subprocess.run(self.qemu.in_netns(*argv), capture_output=True, text=True, check=True).stdout

    def qemu_pid(self, domain: str) -> int:
        return int(self.qemu.path(f"/run/libvirt/qemu/{domain}.pid").read_text().strip())


def condition(vm: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in vm.get("status", {}).get("conditions", []) if c["type"] == type_), {})


@pytest.fixture(scope="session")
def fleet(control_plane: ControlPlane, kubectl: Kubectl, qemu_node: LibvirtNode) -> Iterator[Fleet]:
    install_rbac(kubectl)
    for node, zone in TEST_NODES.items():
        register_node(kubectl, node, {"zone": zone}, TEST_DRIVER_ALLOCATABLE)
    register_node(kubectl, QEMU_NODE, {"zone": "q"})
    kubectl("taint", "node", QEMU_NODE, "dedicated=qemu:NoSchedule", "--overwrite")
    controller_config = service_account_kubeconfig(kubectl, control_plane, "formation-vmm-controller")
    # Each agent's token is bound to its node, as the DaemonSet's are.
    agent_config = {
        node: service_account_kubeconfig(kubectl, control_plane, "formation-vmm-agent", node)
        for node in [*TEST_NODES, QEMU_NODE]
    }
    controller = start_controller(
        control_plane,
        {"VMM_NODE_LOST_SECONDS": "6", "VMM_SEAL_REFRESH_SECONDS": "2"},
        kubeconfig=controller_config,
        route=kubectl,
    )
    agents = {
        node: start_agent(
            control_plane,
            node,
            "test:///default",
            "test",
            {**FAST, "VMM_RESERVED_CPUS": str(TEST_NODE_RESERVED_CPUS)},
            kubeconfig=agent_config[node],
        )
        for node in TEST_NODES
    }
    # One sync worker on node-q: a sync that blocked would hold every VM of the node (tested).
    agents[QEMU_NODE] = start_agent(
        control_plane,
        QEMU_NODE,
        qemu_node.uri,
        "qemu",
        # Our private libvirtd runs QEMU as root with no MAC driver: allowed here, refused in production.
        {
            **FAST,
            "VMM_SYNC_WORKERS": "1",
            "VMM_ALLOW_UNCONFINED_QEMU": "true",
            # Its guests' networks live in its own network namespace: so do its probes.
            "VMM_PROBE_NETNS": str(qemu_node.netns_path()),
        },
        kubeconfig=agent_config[QEMU_NODE],
    )
    fleet = Fleet(control_plane, kubectl, controller, agents, qemu_node)
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


def _where(vm: dict[str, Any] | None) -> str:
    if vm is None:
        return "not found"
    status = vm.get("status") or {}
    conditions = {
        c.get("type"): f"{c.get('status')} {c.get('reason')}: {c.get('message')}"
        for c in status.get("conditions") or []
    }
    return (
        f"label {(vm['metadata'].get('labels') or {}).get('vmm.formation.cloud/node')!r}, "
        f"phase {status.get('phase')!r}, message {status.get('message')!r}, conditions {conditions}"
    )
