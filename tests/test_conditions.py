from datetime import UTC, datetime

import pytest

from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import Condition, to_wire

pytestmark = pytest.mark.pure

T0 = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
T2 = datetime(2026, 1, 1, 0, 2, tzinfo=UTC)


def test_transition_time_moves_only_when_status_changes() -> None:
    conds = set_condition([], "Ready", False, "Starting", at=T0)
    conds = set_condition(conds, "Ready", False, "StillStarting", "msg", generation=3, at=T1)
    assert [to_wire(c) for c in conds] == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "StillStarting",
            "message": "msg",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
            "observedGeneration": 3,
        }
    ]
    conds = set_condition(conds, "Ready", True, "Running", at=T2)
    ready = get_condition(conds, "Ready")
    assert ready is not None and ready.last_transition_time == T2


def test_other_writers_conditions_are_kept_as_read() -> None:
    scheduled = Condition.model_validate(
        {
            "type": "Scheduled",
            "status": "True",
            "reason": "Scheduled",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    )
    conds = set_condition([scheduled], "Ready", True, "Running", at=T1)
    assert [c.type for c in conds] == ["Scheduled", "Ready"]
    assert to_wire(conds[0]) == {
        "type": "Scheduled",
        "status": "True",
        "reason": "Scheduled",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
