"""Everything on top of a bare control plane that a working Formation VMM needs: CRDs, the
namespace and RBAC, hypervisor Node objects, and the controller and agent processes.

Shared by ``vmm dev up`` and the control-plane test fixtures, so the tests exercise exactly what
users start.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from formation_vmm.api.names import HYPERVISOR_LABEL
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.processes import free_port, spawn, stop


def source_root() -> Path:
    """The checkout this package runs from (crds/, manifests/ live there)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "crds").is_dir() and (parent / "pyproject.toml").exists():
            return parent
    raise RuntimeError("crds/ not found: run from a checkout of formation-vmm (pip install -e .)")


class Kubectl:
    def __init__(self, binary: Path, kubeconfig: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig

    def run(self, *args: str, input_text: str | None = None) -> "subprocess.CompletedProcess[str]":
        return subprocess.run(  # noqa: S603 - fixed binary, argv from this package
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
        )

    def __call__(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        proc = self.run(*args, input_text=input_text)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def apply_docs(self, docs: list[dict[str, object]]) -> None:
        self("apply", "--server-side", "--force-conflicts", "-f", "-", input_text=yaml.safe_dump_all(docs))


def install_crds(kubectl: Kubectl, crds: Path | None = None) -> None:
    directory = crds or source_root() / "crds"
    kubectl("apply", "--server-side", "--force-conflicts", "-k", str(directory))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")


def install_rbac(kubectl: Kubectl) -> None:
    """The namespace, service accounts, RBAC, admission policies and the default VmNetwork of
    manifests/, exactly as users install them."""
    base = source_root() / "manifests" / "base"
    for name in (
        "namespace.yaml",
        "rbac-controller.yaml",
        "rbac-agent.yaml",
        "rbac-users.yaml",
        "policies.yaml",
        "network-default.yaml",
    ):
        kubectl("apply", "--server-side", "--force-conflicts", "-f", str(base / name))


def service_account_kubeconfig(
    kubectl: Kubectl,
    plane: ControlPlane,
    account: str,
    node: str | None = None,
    namespace: str = "formation-vmm",
) -> Path:
    """A kubeconfig that authenticates as ``<namespace>/<account>`` with a bound token, so a
    process run with it has exactly the RBAC granted to that account (manifests/ for ours), its
    context in ``namespace``. With ``node``, the token is bound to that Node, as the DaemonSet's
    pod-bound token is to the pod's node (the token then carries
    authentication.kubernetes.io/node-name)."""
    args = ["create", "token", account, "-n", namespace, "--duration=24h"]
    if node is not None:
        uid = kubectl("get", "node", node, "-o", "jsonpath={.metadata.uid}").strip()
        args += ["--bound-object-kind=Node", f"--bound-object-name={node}", f"--bound-object-uid={uid}"]
    token = kubectl(*args).strip()
    admin = yaml.safe_load(plane.kubeconfig.read_text())
    cluster = admin["clusters"][0]["name"]
    config = {
        **admin,
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [
            {"name": account, "context": {"cluster": cluster, "user": account, "namespace": namespace}}
        ],
        "current-context": account,
    }
    ours = namespace == "formation-vmm"
    path = plane.root / (
        f"kubeconfig-{'' if ours else namespace + '-'}{account}" + (f"-{node}" if node else "")
    )
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


# What libvirt's test driver (test:///default) says of its host: the "machine" of its nodes.
TEST_DRIVER_ALLOCATABLE = {"cpu": "16", "memory": "3Gi"}


def machine_allocatable() -> dict[str, str]:
    """This machine's CPUs and memory, as a kubelet with no reservations reports them."""
    memory_kib = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    return {"cpu": str(os.cpu_count() or 1), "memory": f"{memory_kib}Ki"}


def register_node(
    kubectl: Kubectl,
    name: str,
    labels: dict[str, str] | None = None,
    allocatable: dict[str, str] | None = None,
) -> None:
    """A Node object for a machine that has no kubelet, labeled as a hypervisor. We stand in
    for the kubelet: the Node's ``status.allocatable`` says what the machine has (this one's,
    unless told), which bounds what its agent may claim (controller/binding/nodes.py)."""
    all_labels = {HYPERVISOR_LABEL: "true", "kubernetes.io/hostname": name, **(labels or {})}
    kubectl.apply_docs(
        [{"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": all_labels}}]
    )
    resources = allocatable or machine_allocatable()
    # Its agent answers the controller on this machine's loopback, as a kubelet reports a
    # node's address (controller/serving/agent_links.py).
    addresses = [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}]
    status = {"status": {"capacity": resources, "allocatable": resources, "addresses": addresses}}
    kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))
    # The apiserver taints every new Node not-ready until a kubelet reports; there is no kubelet
    # here, so we stand in for it. Placement itself honours every taint.
    kubectl("taint", "node", name, "node.kubernetes.io/not-ready:NoSchedule-", check=False)


@dataclass
class OperatorProcess:
    name: str
    pid: int
    port: int
    log: Path
    argv: list[str]
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def debug_url(self) -> str | None:
        """The agent's node-local debug endpoints (loopback only), when it serves them."""
        port = self.env.get("VMM_DEBUG_PORT")
        return f"http://127.0.0.1:{port}" if port and port != "0" else None

    def kill(self) -> None:
        """Stop it the hard way, as a crash or a lost node would."""
        stop(self.pid, timeout=0)

    def restart(self, plane: ControlPlane) -> None:
        """Start it again exactly as before (same port, same environment)."""
        self.pid = spawn(self.argv, self.log, env=self.env)
        plane.processes.add(self.name, self.pid)

    def wait_ready(self, timeout: float = 60.0) -> None:
        from formation_vmm.devcluster.processes import alive

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(self.pid):
                tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
                raise RuntimeError(f"{self.name} exited; log {self.log}:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s; see {self.log}")


def start_operator(
    plane: ControlPlane,
    name: str,
    command: list[str],
    env_extra: dict[str, str],
    kubeconfig: Path | None = None,
) -> OperatorProcess:
    """Start ``vmm <command>`` against ``plane`` as a recorded background process."""
    port = free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig or plane.kubeconfig),
        "VMM_API_PORT": str(port),
        "VMM_API_HOST": "127.0.0.1",
        # The agent's TLS port for the controller, and the controller's aggregated API: loopback.
        "VMM_ACCESS_PORT": str(free_port()),
        "VMM_SUBRESOURCES_PORT": str(free_port()),
        "VMM_SUBRESOURCES_HOST": "127.0.0.1",
        "PYTHONUNBUFFERED": "1",
        **env_extra,
    }
    log = plane.logs / f"{name}.log"
    argv = [sys.executable, "-m", "formation_vmm.cli", *command]
    pid = spawn(argv, log, env=env)
    plane.processes.add(name, pid)
    return OperatorProcess(name=name, pid=pid, port=port, log=log, argv=argv, env=env)


def route_subresources(kubectl: Kubectl, port: int) -> None:
    """The APIService of manifests/ with its Service an ExternalName for localhost: the apiserver
    proxies our aggregated API to the controller on this machine's ``port``. (A ClusterIP
    Service would need kube-proxy; an Endpoints address may not be loopback.)"""
    manifest = source_root() / "manifests" / "base" / "subresources.yaml"
    service, api_service = yaml.safe_load_all(manifest.read_text())
    service["spec"] = {
        "type": "ExternalName",
        "externalName": "localhost",
        "ports": [{"name": "https", "port": port}],
    }
    api_service["spec"]["service"]["port"] = port
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    current = kubectl("get", "service", "-n", namespace, name, "-o", "jsonpath={.spec.type}", check=False)
    if current and current != "ExternalName":  # a type a Service cannot be changed from by apply
        kubectl("delete", "service", "-n", namespace, name)
    kubectl.apply_docs([service, api_service])


def start_agent(
    plane: ControlPlane,
    node: str,
    libvirt_uri: str,
    domain_type: str,
    env_extra: dict[str, str] | None = None,
    kubeconfig: Path | None = None,
) -> OperatorProcess:
    base = plane.root / "nodes" / node
    env = {
        "VMM_NODE_NAME": node,
        "VMM_LIBVIRT_URI": libvirt_uri,
        "VMM_DOMAIN_TYPE": domain_type,
        "VMM_VM_DIR": str(base / "run"),
        "VMM_DISKS_DIR": str(base / "disks"),
        "VMM_IMAGES_DIR": str(base / "images"),
        "VMM_IMAGE_CACHE_DIR": str(base / "image-cache"),
        "VMM_STATE_DIR": str(base / "agent"),
        # The node-local debug endpoints (/vms, /images), on loopback as always.
        "VMM_DEBUG_PORT": str(free_port()),
        **(env_extra or {}),
    }
    return start_operator(plane, f"agent-{node}", ["agent"], env, kubeconfig)


def start_controller(
    plane: ControlPlane,
    env_extra: dict[str, str] | None = None,
    kubeconfig: Path | None = None,
    route: Kubectl | None = None,
) -> OperatorProcess:
    """The controller; with ``route``, the apiserver proxies our aggregated API to it."""
    controller = start_operator(plane, "controller", ["controller"], env_extra or {}, kubeconfig)
    if route is not None:
        route_subresources(route, int(controller.env["VMM_SUBRESOURCES_PORT"]))
    return controller
