"""What the node tier's tests read of a NodeCluster: our pods by component, their readiness,
and the sample guest's boot id (asked from inside the cluster's network namespace)."""

from pathlib import Path

from formation_vmm.devcluster.cluster import Kubectl
from formation_vmm.devcluster.node_cluster import NAMESPACE, NodeCluster
from tests.support.waiting import get_json


def kubectl_of(cluster: NodeCluster) -> Kubectl:
    return Kubectl(cluster.bins / "kubectl", cluster.kubeconfig)


def pods(kubectl: Kubectl, component: str) -> list[dict]:  # type: ignore[type-arg]
    found = get_json(kubectl, "pods", "-n", NAMESPACE, "-l", f"app.kubernetes.io/component={component}")
    return [p for p in found["items"] if not p["metadata"].get("deletionTimestamp")]


def all_ready(kubectl: Kubectl, component: str, count: int) -> list[str] | None:
    """The names of ``count`` pods of ``component``, once exactly that many run and all are Ready."""
    running = pods(kubectl, component)
    ready = [
        p["metadata"]["name"]
        for p in running
        if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
    ]
    return ready if len(ready) == count == len(running) else None


def guest_boot_id(cluster: NodeCluster, address: str) -> str:
    """The sample guest's HTTP answer names its boot id."""
    done = cluster.in_node("curl", "-sf", "--max-time", "5", f"http://{address}/")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def sample_running(kubectl: Kubectl, ready: bool = False) -> dict | None:  # type: ignore[type-arg]
    """The sample VM once Running (and Ready, if asked); None before, status or not."""
    vm = get_json(kubectl, "vm", "sample", "-n", "default")
    status = vm.get("status", {})
    if status.get("phase") != "Running":
        return None
    conditions = status.get("conditions", [])
    if ready and not any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
        return None
    return vm


def commands_naming(path: Path) -> list[bytes]:
    """The command lines of this machine's processes that name ``path``: what a stopped
    cluster must not leave running."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(path).encode() in cmdline:
                found.append(cmdline)
    return found
