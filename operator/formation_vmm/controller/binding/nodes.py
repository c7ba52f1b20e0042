"""Read a Node object into placement's NodeInfo. Pure.

What a node offers is what its agent publishes (its annotations: the host as libvirt sees it,
less the reserve), bounded by what someone other than the agent vouches for: the kubelet's
``status.allocatable``, or an admin's ceiling (settings ``node_max_cpus``, ``node_max_memory``).
An agent writes its own Node's annotations, so a compromised one could claim a huge host and
draw new VMs, and the Secrets sealed for them (issue 26); a node nobody vouches for takes none.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from formation_vmm.api.names import (
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_DISK_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    HEARTBEAT_ANNOTATION,
)
from formation_vmm.api.quantity import QuantityError, parse_quantity
from formation_vmm.placement import NodeInfo


@dataclass(frozen=True)
class Ceiling:
    """An admin's bound on every node's capacity, where no kubelet reports one (None: none)."""

    cpus: int | None = None
    memory: int | None = None


def _cpus(text: str) -> int:
    """Whole CPUs of a CPU quantity, rounded down (``15500m`` is 15)."""
    if text.endswith("m"):
        return int(text[:-1]) // 1000
    return parse_quantity(text)


def _bound(claimed: int | None, *bounds: int | None) -> int | None:
    if claimed is None:
        return None
    return min([claimed, *(b for b in bounds if b is not None)])


def node_info(
    summary: dict[str, Any], lost_after: float, now: datetime | None = None, ceiling: Ceiling | None = None
) -> NodeInfo:
    """A node is ready while its agent's heartbeat is younger than ``lost_after`` seconds."""
    ann = summary.get("annotations", {})
    cpus: int | None
    memory: int | None
    try:
        cpus = int(ann[CAPACITY_CPUS_ANNOTATION])
        memory = parse_quantity(ann[CAPACITY_MEMORY_ANNOTATION])
    except (KeyError, ValueError, QuantityError):
        cpus = memory = None
    limit = ceiling or Ceiling()
    allocatable = summary.get("allocatable") or {}
    vouched = bool(allocatable) or (limit.cpus is not None and limit.memory is not None)
    cpus = _bound(cpus, allocatable.get("cpus"), limit.cpus)
    memory = _bound(memory, allocatable.get("memory"), limit.memory)
    disk: int | None
    try:
        disk = parse_quantity(ann[CAPACITY_DISK_ANNOTATION])
    except (KeyError, QuantityError):
        disk = None
    ready = False
    beat = ann.get(HEARTBEAT_ANNOTATION)
    if beat:
        try:
            at = datetime.fromisoformat(beat.replace("Z", "+00:00"))
            ready = ((now or datetime.now(UTC)) - at).total_seconds() < lost_after
        except ValueError:
            ready = False
    return NodeInfo(
        name=summary["name"],
        labels=summary.get("labels", {}),
        taints=tuple(summary.get("taints", [])),
        cpus=cpus,
        memory=memory,
        ready=ready,
        disk=disk,
        vouched=vouched,
    )


def node_summary(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a Node the controller's placement reads (kept in memory per node)."""
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    return {
        "name": meta.get("name"),
        "labels": dict(meta.get("labels") or {}),
        "annotations": dict(meta.get("annotations") or {}),
        "taints": [dict(t) for t in spec.get("taints") or []],
        "allocatable": _allocatable((body.get("status") or {}).get("allocatable") or {}),
    }


def _allocatable(reported: dict[str, Any]) -> dict[str, int]:
    """The kubelet's allocatable CPUs and memory; a figure that does not parse is left out,
    and a node with neither is one no kubelet vouches for."""
    found = {}
    try:
        found["cpus"] = _cpus(str(reported["cpu"]))
        found["memory"] = parse_quantity(str(reported["memory"]))
    except (KeyError, ValueError, QuantityError):
        return {}
    return found
