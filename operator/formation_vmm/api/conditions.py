"""Condition lists as Kubernetes API conventions want them. Pure.

Status is written with JSON merge patches, which replace lists whole, so each writer sends the
full list: its own conditions updated, everyone else's kept as read.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

from formation_vmm.api.models import Condition, ConditionStatus


def now() -> datetime:
    """The current time as conditions and timestamps carry it: UTC, whole seconds."""
    return datetime.now(UTC).replace(microsecond=0)


def _text(status: bool | ConditionStatus) -> ConditionStatus:
    if isinstance(status, bool):
        return "True" if status else "False"
    return status


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: bool | ConditionStatus,
    reason: str,
    message: str = "",
    generation: int | None = None,
    at: datetime | None = None,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; lastTransitionTime moves only when status does."""
    text = _text(status)
    result = list(conditions)
    old = next((c for c in result if c.type == type_), None)
    moved = old is None or old.status != text or old.last_transition_time is None
    stamp = (at or now()) if moved or old is None else old.last_transition_time
    new = Condition(type=type_, status=text, reason=reason, message=message, last_transition_time=stamp)
    if generation is not None:
        new.observed_generation = generation
    if old is None:
        result.append(new)
    else:
        result[result.index(old)] = new
    return result


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
