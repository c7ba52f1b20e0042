"""A VmImage's status: each agent writes its own node's entry, and the overall fields are
recomputed from all entries on every write, so any agent's write leaves them consistent. Pure."""

from typing import Any

from formation_vmm.api.conditions import set_condition

ORDER = ("Failed", "Downloading", "Converting", "Pending")


def summarize(nodes: list[dict[str, Any]]) -> str:
    """Failed if any node failed, else the least advanced state; Ready only when all are."""
    phases = {n.get("phase") for n in nodes}
    for phase in ORDER:
        if phase in phases:
            return phase
    return "Ready" if nodes else "Pending"


def with_node(
    status: dict[str, Any],
    node: str,
    phase: str,
    message: str | None = None,
    details: dict[str, Any] | None = None,
    generation: int | None = None,
) -> dict[str, Any]:
    """The status fields to write when ``node``'s state of the image becomes ``phase``.
    ``details``: progress, size, virtualSize, format as this node knows them."""
    entry: dict[str, Any] = {"name": node, "phase": phase}
    if message:
        entry["message"] = message
    nodes = [n for n in status.get("nodes") or [] if n.get("name") != node] + [entry]
    nodes.sort(key=lambda n: str(n.get("name")))
    overall = summarize(nodes)
    failed = [n for n in nodes if n.get("phase") == "Failed"]
    if overall == "Ready":
        reason, text = "Imported", f"cached on {len(nodes)} node(s)"
    elif failed:
        reason, text = "ImportFailed", "; ".join(f"{n['name']}: {n.get('message', 'failed')}" for n in failed)
    else:
        reason, text = (
            overall,
            f"{overall.lower()} on {', '.join(n['name'] for n in nodes if n['phase'] != 'Ready')}",
        )
    fields: dict[str, Any] = {
        "phase": overall,
        "nodes": nodes,
        "conditions": set_condition(
            status.get("conditions"), "Ready", overall == "Ready", reason, text, generation
        ),
    }
    fields.update(details or {})
    return fields


def node_entry(status: dict[str, Any], node: str) -> dict[str, Any] | None:
    for entry in status.get("nodes") or []:
        if entry.get("name") == node:
            return dict(entry)
    return None
