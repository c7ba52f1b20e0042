"""``vmm dev up|down|status``: a whole Formation VMM on this machine, left running in the
background. By default there is no kubelet: ``up`` registers this machine's Node object itself
and runs the controller and agent as processes. ``up --kubelet`` makes a real node instead
(node_cluster.py) and installs the product on it with `helm install` of the image built here."""

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from formation_vmm.agent.hypervisor import Hypervisor, probe
from formation_vmm.devcluster import guest
from formation_vmm.devcluster.cluster import (
    Kubectl,
    OperatorProcess,
    install_crds,
    install_rbac,
    register_node,
    source_root,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.controlplane import ControlPlane, find_binaries
from formation_vmm.devcluster.libvirt_node import LibvirtNode, LibvirtNodeError
from formation_vmm.devcluster.node_cluster import APPLY_SAMPLE, NAMESPACE, NodeCluster
from formation_vmm.devcluster.processes import alive, stop
from formation_vmm.domain.xml import observe


def state_dir() -> Path:
    default = (
        Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "formation-vmm" / "dev"
    )
    return Path(os.environ.get("VMM_DEV_DIR", default))


def node_name() -> str:
    """This machine's hostname as a Node name (lower case, DNS-1123)."""
    raw = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in raw).strip("-")
    return cleaned or "localhost"


def _kvm_usable() -> bool:
    """KVM is used only on bare metal: here /dev/kvm exists inside a VM, and a nested KVM guest
    hangs at boot, so inside a hypervisor (the cpuinfo 'hypervisor' flag) guests run on TCG."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " hypervisor" not in cpuinfo


@dataclass(frozen=True)
class NodeLibvirt:
    uri: str
    domain_type: str
    warning: str | None = None
    netns: Path | None = None  # where the node's VM networks (and so its probes) live
    # The node's own libvirtd: its socket, and its migration relay's directory, both as seen
    # from outside its mount namespace.
    socket: Path | None = None
    relay_dir: Path | None = None


def start_libvirt(plane: ControlPlane, node: str) -> NodeLibvirt:
    """The node's libvirt, and a warning when it is not what the user may expect. By default
    the node gets a libvirtd of its own (in a mount and a network namespace, see
    ``libvirt_node``), so the dev cluster never shares this machine's libvirtd.
    ``VMM_LIBVIRT_URI`` names another (``test:///default`` for libvirt's test driver); without
    root or libvirtd, the test driver it is, with a warning."""
    domain_type = os.environ.get("VMM_DOMAIN_TYPE") or ("kvm" if _kvm_usable() else "qemu")
    uri = os.environ.get("VMM_LIBVIRT_URI")
    if uri is not None:
        if uri.startswith("test:"):
            return NodeLibvirt(uri, "test")
        why = probe(uri)
        if why is None:
            return NodeLibvirt(uri, domain_type)
        return _test_driver(f"cannot reach libvirt at {uri} ({why})")
    if os.geteuid() != 0 or not shutil.which("libvirtd") or not shutil.which("unshare"):
        return _test_driver("a node libvirtd needs root, libvirtd and unshare")
    # The node's VM networks live in a network namespace of its own unless the user asks for
    # the host's (docs/development.md): this machine routes private ranges off itself.
    host_network = os.environ.get("VMM_DEV_HOST_NETWORK", "").lower() in ("1", "true", "yes")
    libvirt = LibvirtNode(
        _libvirt_root(plane.root, node), node, plane.processes, network_namespace=not host_network
    )
    try:
        libvirt.start()
    except LibvirtNodeError as exc:
        return _test_driver(str(exc))
    return NodeLibvirt(
        libvirt.uri,
        domain_type,
        netns=libvirt.netns_path() if libvirt.network_namespace else None,
        socket=libvirt.socket,
        relay_dir=libvirt.relay_dir,
    )


def _test_driver(why: str) -> NodeLibvirt:
    return NodeLibvirt(
        "test:///default",
        "test",
        f"WARNING: {why}; the agent uses libvirt's test driver (test:///default): VMs get "
        "domains, but no guest really runs. Run `vmm dev up` as root on a machine with libvirt "
        "(hack/install-system-deps.sh) for real guests.",
    )


def _libvirt_root(root: Path, node: str) -> Path:
    return root / "nodes" / node / "libvirt"


def _print(msg: str) -> None:
    print(msg, flush=True)


def node_names(count: int) -> list[str]:
    """The dev cluster's Node names: this machine's hostname, then ``<hostname>-2`` and on."""
    base = node_name()
    return [base] + [f"{base}-{i}" for i in range(2, count + 1)]


def up(sample: bool = True, kubelet: bool = False, nodes: int = 1) -> int:
    """``nodes`` hypervisor nodes, each with a libvirtd and an agent of its own (issue 12: the
    nodes a VM moves between); the sample VM lands where the controller places it."""
    if kubelet:
        return _up_kubelet(sample)
    if nodes < 1:
        raise ValueError(f"a dev cluster needs at least one node, not {nodes}")
    shared = os.environ.get("VMM_LIBVIRT_URI", "")
    if nodes > 1 and shared and not shared.startswith("test:"):
        # Two agents on one libvirtd would each take the other's domains for leftovers.
        _print(f"VMM_LIBVIRT_URI names one libvirtd ({shared}); --nodes {nodes} needs one per node: unset it")
        return 2
    root = state_dir()
    plane = ControlPlane(root)
    if plane.running() and (root / "info.json").exists():
        _print("formation-vmm dev cluster is already running")
        return status()
    _print(f"starting the control plane in {root}")
    started = time.monotonic()
    down(quiet=True)
    plane.start()
    _print(f"control plane ready in {time.monotonic() - started:.1f}s")
    kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
    install_crds(kubectl)
    install_rbac(kubectl)  # the namespace, as an install has it (the controller's Lease lives there)
    controller = start_controller(plane, route=kubectl)  # consoles through the apiserver
    agents: dict[str, tuple[NodeLibvirt, OperatorProcess]] = {}
    for node in node_names(nodes):
        register_node(kubectl, node)
        libvirt = start_libvirt(plane, node)
        if libvirt.warning:
            _print(libvirt.warning)
        # The dev cluster's private libvirtd runs QEMU as root: allowed here only (docs/security.md).
        env = {"VMM_ALLOW_UNCONFINED_QEMU": "true"}
        if libvirt.netns is not None:
            env["VMM_PROBE_NETNS"] = str(libvirt.netns)  # probes reach the guests where they live
        if libvirt.domain_type != "test" and libvirt.relay_dir is not None and libvirt.socket is not None:
            # Each node's agent runs the migration relay on a port of its own, over TLS, as on
            # separate machines (docs/migration.md). The test driver does not migrate.
            env["VMM_MIGRATION_RELAY_LISTEN"] = "127.0.0.1:0"
            env["VMM_MIGRATION_RELAY_HOST_DIR"] = str(libvirt.relay_dir)
            env["VMM_MIGRATION_LIBVIRT_SOCKET"] = str(libvirt.socket)
        elif libvirt.domain_type != "test":
            # A libvirtd named by VMM_LIBVIRT_URI, shared by the nodes: straight to it.
            env["VMM_MIGRATION_LIBVIRT_URI"] = libvirt.uri
            env["VMM_MIGRATION_SOCKET_DIR"] = str(root / "nodes" / node / "migration")
        agents[node] = (libvirt, start_agent(plane, node, libvirt.uri, libvirt.domain_type, env))
    drivers = {libvirt.domain_type for libvirt, _ in agents.values()}
    if len(drivers) > 1:  # a node fell back to the test driver: its VMs would never really run
        _print(f"the nodes' libvirts differ ({', '.join(sorted(drivers))}): see the warning above; stopping")
        down(quiet=True)
        return 1
    controller.wait_ready()
    for _, agent in agents.values():
        agent.wait_ready()
    first, (libvirt, agent) = next(iter(agents.items()))
    (root / "info.json").write_text(
        json.dumps(
            {
                "node": first,
                "nodes": list(agents),
                "libvirt_uri": libvirt.uri,
                "domain_type": libvirt.domain_type,
                "agent_port": agent.port,
                "agent_ports": {node: process.port for node, (_, process) in agents.items()},
                "controller_port": controller.port,
            }
        )
    )
    for node, (libvirt, _) in agents.items():
        _print(
            f"controller and agent ready (node {node}, libvirt {libvirt.uri}, "
            f"domain type {libvirt.domain_type})"
        )
    if sample:
        images = [plane.root / "nodes" / n / "images" for n in agents]
        _apply_sample(kubectl, images, real=libvirt.domain_type != "test")
    _print(kubectl("get", "vm", "-A"))
    _print(f"export KUBECONFIG={plane.kubeconfig}")
    return 0


def _kubelet_cluster(root: Path) -> NodeCluster:
    """The node brings nothing but the kernel: libvirtd and QEMU run in the chart's own pods
    (its `libvirtd.enabled`), as on a node that has only /dev/kvm."""
    return NodeCluster(root / "kubelet", find_binaries(recorded=root / "bin-dir"), chart_libvirtd=True)


def _up_kubelet(sample: bool) -> int:
    """A real node (kubelet, containerd, CNI, kube-proxy) and the README's install steps on it:
    the chart from the images built here, with its libvirtd, then the sample VM."""
    root = state_dir()
    down(quiet=True)
    started = time.monotonic()
    _print(f"building the images and starting a kubelet node in {root / 'kubelet'}")
    cluster = _kubelet_cluster(root)
    cluster.start()
    _print(f"node {cluster.node.name} Ready in {time.monotonic() - started:.1f}s; helm install")
    cluster.install()
    kubectl = Kubectl(cluster.bins / "kubectl", cluster.kubeconfig)
    # The agent is Ready only once libvirt answers: the chart's libvirtd runs too (its
    # DaemonSet, updated OnDelete, has no rollout status).
    for workload in ("deployment/formation-vmm-controller", "daemonset/formation-vmm-agent"):
        kubectl("rollout", "status", workload, "-n", NAMESPACE, "--timeout=300s")
    (root / "info.json").write_text(json.dumps({"mode": "kubelet", "node": cluster.node.name}))
    if sample:
        cluster.run(APPLY_SAMPLE)
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "--timeout=180s", "vm/sample")
    _print(kubectl("get", "nodes,vm", "-A", "-o", "wide"))
    _print(
        f"the agent answers at the node's address inside the cluster's network namespace: "
        f"nsenter --net=/run/netns/{cluster.netns} kubectl vm console sample"
    )
    _print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _apply_sample(kubectl: Kubectl, images_dirs: list[Path], real: bool) -> None:
    """The sample VM boots a real kernel on the default network, Ready once its HTTP server
    answers the readiness probe, when the nodes run real guests and this machine has a kernel
    (Debian's cloud kernel); else it is a VM with a blank disk and nothing to boot. Every node
    gets the kernel's files (hostPath disks): the VM may be placed, or moved, on any."""
    examples = source_root() / "manifests" / "examples"
    try:
        if not real:
            raise FileNotFoundError("libvirt's test driver runs no guest")
        built = guest.install(images_dirs[0], "sample")[0].parent
        for images_dir in images_dirs[1:]:  # the same files: the initramfs is built once
            shutil.copytree(built, images_dir / "sample", dirs_exist_ok=True)
    except FileNotFoundError as exc:
        _print(f"WARNING: {exc}; the sample VM gets a blank disk instead of a kernel to boot")
        kubectl("apply", "-f", str(examples / "vm-blank.yaml"))
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "--timeout=120s", "vm/blank")
        return
    kubectl("apply", "-f", str(examples / "vm-sample.yaml"))
    kubectl("wait", "--for=jsonpath={.status.phase}=Running", "--timeout=120s", "vm/sample")
    _print(
        "the sample VM boots Debian's cloud kernel on the default network and turned Ready through "
        "its readiness probe; see its console with: kubectl vm console sample"
    )


def down(quiet: bool = False) -> int:
    """Stop everything ``up`` started and remove every domain and file it created, whether or
    not its processes are still alive (after a crash of the agent, the guests still run)."""
    root = state_dir()
    if (root / "kubelet").is_dir():
        cluster = _kubelet_cluster(root)
        if cluster.plane.running():  # the agent removes the domains while it still runs
            kubectl = Kubectl(cluster.bins / "kubectl", cluster.kubeconfig)
            kubectl("delete", "vm", "--all", "-A", "--wait=true", "--timeout=60s", check=False)
        cluster.stop()
        shutil.rmtree(root / "kubelet", ignore_errors=True)
        (root / "info.json").unlink(missing_ok=True)
    plane = ControlPlane(root)
    table = plane.processes.read()
    if table and all(alive(pid) for pid in table.values()):
        # Let the agent remove the domains while it still runs: the graceful way.
        kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
        kubectl("delete", "vm", "--all", "-A", "--wait=true", "--timeout=60s", check=False)
    # Whatever is left: no agent may start a guest again while it is removed.
    for name, pid in table.items():
        if name == "controller" or name.startswith("agent-"):
            stop(pid)
    nodes = root / "nodes"
    node_dirs = sorted(p.parent for p in nodes.glob("*/libvirt"))
    for node_dir in node_dirs:
        for name in LibvirtNode(node_dir / "libvirt", node_dir.name, plane.processes).destroy_domains():
            _print(f"removed domain {name}, left behind by a dev cluster process that died")
    uri = _recorded_uri(root)
    if uri is not None:  # a libvirtd of the user's: only the domains whose files are ours
        for name in sweep_domains(uri, nodes):
            _print(f"removed domain {name}, left behind by a dev cluster process that died")
    plane.stop()
    for node_dir in node_dirs:  # its libvirtd died before it could destroy them
        LibvirtNode(node_dir / "libvirt", node_dir.name, plane.processes).kill_leftovers()
    shutil.rmtree(nodes, ignore_errors=True)
    (root / "info.json").unlink(missing_ok=True)
    if not quiet:
        _print("formation-vmm dev cluster stopped")
    return 0


def _recorded_uri(root: Path) -> str | None:
    """The libvirt URI `up` used when it was not a node libvirtd of the dev cluster's own."""
    try:
        info = json.loads((root / "info.json").read_text())
    except (OSError, ValueError):
        return None
    uri = info.get("libvirt_uri")
    return uri if isinstance(uri, str) and "socket=" + str(root) not in uri else None


def sweep_domains(uri: str, files_root: Path) -> list[str]:
    """Destroy and undefine the domains of ours whose files lie under ``files_root`` (the dev
    cluster's node directories) on a libvirtd the dev cluster does not own: exactly those it
    created, never another's. libvirt's test driver keeps no domain beyond its process."""
    if uri.startswith("test:") or probe(uri) is not None:
        return []
    hypervisor = Hypervisor(uri)
    removed = []
    try:
        for info in hypervisor.owned_domains():
            paths = observe(hypervisor.domain_xml(info.name)).file_paths
            if any(Path(p).is_relative_to(files_root) for p in paths):
                hypervisor.destroy(info.name)
                hypervisor.undefine(info.name)
                removed.append(info.name)
    finally:
        hypervisor.close()
    return removed


def status() -> int:
    root = state_dir()
    plane = ControlPlane(root)
    if (root / "kubelet").is_dir():
        cluster = _kubelet_cluster(root)
        plane = cluster.plane
        for name, pid in cluster.processes.read().items():
            _print(f"{name:28} pid {pid:<8} {'running' if alive(pid) else 'NOT RUNNING'}")
    table = plane.processes.read()
    if not table:
        _print("formation-vmm dev cluster is not running (start it with `vmm dev up`)")
        return 1
    for name, pid in table.items():
        _print(f"{name:28} pid {pid:<8} {'running' if alive(pid) else 'NOT RUNNING'}")
    if plane.running():
        kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
        _print(kubectl("get", "nodes,vm", "-A", check=False))
        _print(f"export KUBECONFIG={plane.kubeconfig}")
        return 0
    return 1
