"""A VmImage's status: each agent writes its own node's entry, and the overall fields are
recomputed from all entries on every write, so any agent's write leaves them consistent. Pure."""

from formation_vmm.api.conditions import set_condition
from formation_vmm.api.models import ImageNodeStatus, ImagePhase, VmImageStatus

# The overall phase is the first of these any node is in; Ready only when every node is.
ORDER: tuple[ImagePhase, ...] = ("Failed", "Downloading", "Converting", "Pending")


def summarize(nodes: list[ImageNodeStatus]) -> ImagePhase:
    """Failed if any node failed, else the least advanced state; Ready only when all are."""
    phases = {n.phase for n in nodes}
    for phase in ORDER:
        if phase in phases:
            return phase
    return "Ready" if nodes else "Pending"


def with_node(
    status: VmImageStatus,
    node: str,
    phase: ImagePhase,
    message: str | None = None,
    details: VmImageStatus | None = None,
    generation: int | None = None,
) -> VmImageStatus:
    """The status fields to write when ``node``'s state of the image becomes ``phase``.
    ``details``: progress, size, virtualSize, format as this node knows them (the fields set)."""
    entry = ImageNodeStatus(name=node, phase=phase)
    if message:
        entry.message = message
    nodes = [n for n in status.nodes if n.name != node] + [entry]
    nodes.sort(key=lambda n: n.name)
    fields = _overall(status, nodes, generation)
    for name in details.model_fields_set if details is not None else set():
        setattr(fields, name, getattr(details, name))
    return fields


def without_node(status: VmImageStatus, node: str) -> VmImageStatus | None:
    """The status fields without ``node``'s entry (a deleted Node: its agent, which wrote it, is
    gone), the overall ones recomputed (a failure there no longer fails the image); None when
    it has no such entry."""
    nodes = [n for n in status.nodes if n.name != node]
    if len(nodes) == len(status.nodes):
        return None
    condition = next((c for c in status.conditions if c.type == "Ready"), None)
    return _overall(status, nodes, condition.observed_generation if condition else None)


def _overall(status: VmImageStatus, nodes: list[ImageNodeStatus], generation: int | None) -> VmImageStatus:
    """The nodes' entries and the overall phase and Ready condition they make."""
    overall = summarize(nodes)
    failed = [n for n in nodes if n.phase == "Failed"]
    if overall == "Ready":
        reason, text = "Imported", f"cached on {len(nodes)} node(s)"
    elif failed:
        reason, text = "ImportFailed", "; ".join(f"{n.name}: {n.message or 'failed'}" for n in failed)
    else:
        reason, text = (
            overall,
            f"{overall.lower()} on {', '.join(n.name for n in nodes if n.phase != 'Ready')}",
        )
    fields = VmImageStatus(
        phase=overall,
        nodes=nodes,
        conditions=set_condition(status.conditions, "Ready", overall == "Ready", reason, text, generation),
    )
    return fields


def node_entry(status: VmImageStatus, node: str) -> ImageNodeStatus | None:
    return next((entry for entry in status.nodes if entry.name == node), None)
