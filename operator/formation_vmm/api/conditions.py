"""Condition lists as Kubernetes API conventions want them. Pure.

Status is written with JSON merge patches, which replace lists whole, so each writer sends the
full list: its own conditions updated, everyone else's kept as read.
"""

from datetime import UTC, datetime
from typing import Any


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    generation: int | None = None,
    at: str | None = None,
) -> list[dict[str, Any]]:
    """Return ``conditions`` with ``type_`` set; lastTransitionTime moves only when status does."""
    text = status if isinstance(status, str) else ("True" if status else "False")
    result = [dict(c) for c in conditions or []]
    old = next((c for c in result if c.get("type") == type_), None)
    new: dict[str, Any] = {"type": type_, "status": text, "reason": reason, "message": message}
    if generation is not None:
        new["observedGeneration"] = generation
    if old is not None and old.get("status") == text and old.get("lastTransitionTime"):
        new["lastTransitionTime"] = old["lastTransitionTime"]
    else:
        new["lastTransitionTime"] = at or now()
    if old is None:
        result.append(new)
    else:
        result[result.index(old)] = new
    return result


def get_condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)
