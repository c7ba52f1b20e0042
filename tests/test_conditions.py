import pytest

from formation_vmm.api.conditions import get_condition, set_condition

pytestmark = pytest.mark.pure


def test_transition_time_moves_only_when_status_changes() -> None:
    conds = set_condition(None, "Ready", False, "Starting", at="2026-01-01T00:00:00Z")
    conds = set_condition(conds, "Ready", False, "StillStarting", "msg", at="2026-01-01T00:01:00Z")
    assert get_condition(conds, "Ready") == {
        "type": "Ready",
        "status": "False",
        "reason": "StillStarting",
        "message": "msg",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    conds = set_condition(conds, "Ready", True, "Running", at="2026-01-01T00:02:00Z")
    assert get_condition(conds, "Ready")["lastTransitionTime"] == "2026-01-01T00:02:00Z"  # type: ignore[index]


def test_other_writers_conditions_are_kept() -> None:
    conds = [
        {
            "type": "Scheduled",
            "status": "True",
            "reason": "Scheduled",
            "message": "",
            "lastTransitionTime": "t",
        }
    ]
    conds = set_condition(conds, "Ready", True, "Running")
    assert [c["type"] for c in conds] == ["Scheduled", "Ready"]
