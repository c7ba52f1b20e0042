"""``vmm dev up|down|status``: a whole Formation VMM on this machine, left running in the
background. There is no kubelet: ``up`` registers this machine's Node object itself."""

import json
import os
import socket
import time
from pathlib import Path

from formation_vmm.devcluster import guest
from formation_vmm.devcluster.cluster import (
    Kubectl,
    install_crds,
    register_node,
    source_root,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.processes import alive


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


def choose_libvirt() -> tuple[str, str, str | None]:
    """(uri, domain type, warning): qemu:///system when libvirtd answers, else test:///default."""
    uri = os.environ.get("VMM_LIBVIRT_URI", "qemu:///system")
    if uri.startswith("test:"):
        return uri, "test", None
    try:
        import libvirt

        conn = libvirt.open(uri)
        conn.close()
    except Exception as exc:
        return (
            "test:///default",
            "test",
            f"WARNING: cannot reach libvirt at {uri} ({exc}); the agent uses libvirt's test driver "
            "(test:///default): VMs get domains, but no guest really runs. Start libvirtd "
            "(hack/setup-libvirt.sh) and run `vmm dev up` again for real guests.",
        )
    domain_type = os.environ.get("VMM_DOMAIN_TYPE") or ("kvm" if _kvm_usable() else "qemu")
    return uri, domain_type, None


def _print(msg: str) -> None:
    print(msg, flush=True)


def up(sample: bool = True) -> int:
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
    node = node_name()
    register_node(kubectl, node)
    uri, domain_type, warning = choose_libvirt()
    if warning:
        _print(warning)
    controller = start_controller(plane)
    agent = start_agent(plane, node, uri, domain_type)
    controller.wait_ready()
    agent.wait_ready()
    (root / "info.json").write_text(
        json.dumps(
            {
                "node": node,
                "libvirt_uri": uri,
                "domain_type": domain_type,
                "agent_port": agent.port,
                "controller_port": controller.port,
            }
        )
    )
    _print(f"controller and agent ready (node {node}, libvirt {uri}, domain type {domain_type})")
    if sample:
        _apply_sample(kubectl, plane.root / "nodes" / node / "images")
    _print(kubectl("get", "vm", "-A"))
    _print(f"export KUBECONFIG={plane.kubeconfig}")
    return 0


def _apply_sample(kubectl: Kubectl, images_dir: Path) -> None:
    """The sample VM boots a real kernel when this machine has one (Debian's cloud kernel), else
    it is a VM with a blank disk and nothing to boot."""
    examples = source_root() / "manifests" / "examples"
    try:
        guest.install(images_dir, "sample")
    except FileNotFoundError as exc:
        _print(f"WARNING: {exc}; the sample VM gets a blank disk instead of a kernel to boot")
        kubectl("apply", "-f", str(examples / "vm-blank.yaml"))
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "--timeout=120s", "vm/blank")
        return
    kubectl("apply", "-f", str(examples / "vm-sample.yaml"))
    kubectl("wait", "--for=jsonpath={.status.phase}=Running", "--timeout=120s", "vm/sample")
    _print("the sample VM boots Debian's cloud kernel; see its console with: kubectl vm console sample")


def down(quiet: bool = False) -> int:
    root = state_dir()
    plane = ControlPlane(root)
    table = plane.processes.read()
    if table and all(alive(pid) for pid in table.values()):
        # Let the agent remove the domains while it still runs, so no guest outlives the cluster.
        kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
        kubectl("delete", "vm", "--all", "-A", "--wait=true", "--timeout=60s", check=False)
    plane.stop()
    (root / "info.json").unlink(missing_ok=True)
    if not quiet:
        _print("formation-vmm dev cluster stopped")
    return 0


def status() -> int:
    root = state_dir()
    plane = ControlPlane(root)
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
