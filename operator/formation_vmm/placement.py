"""Where a VM goes: filter the hypervisor nodes, then pick the least loaded. Pure.

Mirrors what kube-scheduler users expect: nodeSelector must match, NoSchedule/NoExecute taints
must be tolerated, and a node must have room for the VM's vCPUs and memory within the
overcommit ratios, and for its disks' declared sizes (never overcommitted: a thin disk still
grows to its size). A VM that fits nowhere gets a message counting why each node was refused.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from formation_vmm.api.models import Toleration
from formation_vmm.api.names import DRAIN_TAINT


@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    taints: tuple[dict[str, Any], ...] = ()
    cpus: int | None = None  # None: no agent has reported capacity for this node yet
    memory: int | None = None
    ready: bool = True
    disk: int | None = None  # bytes for VM disks; None: not reported, not checked
    # Someone other than the node's agent bounds its capacity (the kubelet, an admin's ceiling).
    vouched: bool = True


@dataclass(frozen=True)
class Request:
    vcpus: int
    memory: int
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[Toleration, ...] = ()
    disk: int = 0  # the disks' declared sizes


@dataclass(frozen=True)
class Load:
    vcpus: int = 0
    memory: int = 0
    disk: int = 0

    def __add__(self, other: "Load") -> "Load":
        return Load(self.vcpus + other.vcpus, self.memory + other.memory, self.disk + other.disk)

    def __sub__(self, other: "Load") -> "Load":
        return Load(self.vcpus - other.vcpus, self.memory - other.memory, self.disk - other.disk)


@dataclass(frozen=True)
class Decision:
    node: str | None
    message: str


def tolerates(tolerations: tuple[Toleration, ...], taint: dict[str, Any]) -> bool:
    for tol in tolerations:
        if tol.effect and tol.effect != taint.get("effect"):
            continue
        if tol.operator == "Exists" and (not tol.key or tol.key == taint.get("key")):
            return True
        if (
            tol.operator == "Equal"
            and tol.key == taint.get("key")
            and (tol.value or "") == (taint.get("value") or "")
        ):
            return True
    return False


def _refusal(node: NodeInfo, req: Request, load: Load, cpu_ratio: float, mem_ratio: float) -> str | None:
    if any(node.labels.get(k) != v for k, v in req.node_selector.items()):
        return "do not match the nodeSelector"
    # Whatever the tolerations say (``operator: Exists`` tolerates every taint): a node being
    # drained is being emptied, and a VM placed there would only be moved again, or block it.
    if any(taint.get("key") == DRAIN_TAINT for taint in node.taints):
        return "are being drained"
    for taint in node.taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(req.tolerations, taint):
            return "have a taint the VM does not tolerate"
    if not node.ready:
        return "have no live agent"
    if node.cpus is None or node.memory is None:
        return "have no agent that reported capacity"
    if not node.vouched:
        return "have no capacity the kubelet (status.allocatable) or an admin (node_max_*) vouches for"
    if load.vcpus + req.vcpus > node.cpus * cpu_ratio:
        return "have too few free vCPUs"
    if load.memory + req.memory > node.memory * mem_ratio:
        return "have too little free memory"
    if node.disk is not None and load.disk + req.disk > node.disk:
        return "have too little disk space"
    return None


def room_refusal(node: NodeInfo, req: Request, load: Load, cpu_ratio: float, mem_ratio: float) -> str | None:
    """Why a VM already on ``node`` cannot grow to ``req``, the rest of the node using ``load``
    (its own share taken out), or None. Room only: the VM is there already, so its selector,
    its tolerations, a drain and a silent agent do not count."""
    if node.cpus is None or node.memory is None or not node.vouched:
        return f"node {node.name} has no capacity its agent reported and the kubelet or an admin vouches for"
    if load.vcpus + req.vcpus > node.cpus * cpu_ratio:
        return f"node {node.name} has {_free(node.cpus * cpu_ratio - load.vcpus)} vCPUs free for it"
    if load.memory + req.memory > node.memory * mem_ratio:
        free = max(int(node.memory * mem_ratio) - load.memory, 0)
        return f"node {node.name} has {free >> 20}Mi of memory free for it"
    if node.disk is not None and load.disk + req.disk > node.disk:
        return f"node {node.name} has {max(node.disk - load.disk, 0) >> 20}Mi of disk free for it"
    return None


def _free(value: float) -> str:
    return f"{max(value, 0):g}"


def _score(node: NodeInfo, load: Load, req: Request) -> float:
    """Fraction of the node used after placing the VM, by its scarcest resource: lower is better."""
    cpu = (load.vcpus + req.vcpus) / max(node.cpus or 1, 1)
    mem = (load.memory + req.memory) / max(node.memory or 1, 1)
    return max(cpu, mem)


def place(
    req: Request,
    nodes: list[NodeInfo],
    loads: dict[str, Load],
    cpu_overcommit: float = 1.0,
    memory_overcommit: float = 1.0,
) -> Decision:
    if not nodes:
        return Decision(None, "no node is labeled vmm.formation.cloud/hypervisor=true")
    refusals: Counter[str] = Counter()
    fits: list[NodeInfo] = []
    for node in nodes:
        why = _refusal(node, req, loads.get(node.name, Load()), cpu_overcommit, memory_overcommit)
        if why is None:
            fits.append(node)
        else:
            refusals[why] += 1
    if not fits:
        detail = ", ".join(f"{count} {why}" for why, count in sorted(refusals.items()))
        return Decision(None, f"0/{len(nodes)} hypervisor nodes can take the VM: {detail}")
    best = min(fits, key=lambda n: (_score(n, loads.get(n.name, Load()), req), n.name))
    return Decision(best.name, f"placed on {best.name}")
