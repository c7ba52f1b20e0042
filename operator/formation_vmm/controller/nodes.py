"""Read a Node object into placement's NodeInfo. Pure."""

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


def node_info(summary: dict[str, Any], lost_after: float, now: datetime | None = None) -> NodeInfo:
    """A node is ready while its agent's heartbeat is younger than ``lost_after`` seconds."""
    ann = summary.get("annotations", {})
    cpus: int | None
    memory: int | None
    try:
        cpus = int(ann[CAPACITY_CPUS_ANNOTATION])
        memory = parse_quantity(ann[CAPACITY_MEMORY_ANNOTATION])
    except (KeyError, ValueError, QuantityError):
        cpus = memory = None
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
    }
