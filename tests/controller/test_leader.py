"""Leader election's decision. Pure."""

from datetime import UTC, datetime, timedelta

import pytest

from formation_vmm.controller.leader import LeaseView, Move, decide, view_of

pytestmark = pytest.mark.pure

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("lease", "move"),
    [
        (None, Move.CREATE),
        (LeaseView("me", NOW - timedelta(seconds=3), 15), Move.RENEW),
        (LeaseView("me", NOW - timedelta(seconds=60), 15), Move.RENEW),  # ours, even late
        (LeaseView("other", NOW - timedelta(seconds=3), 15), Move.WAIT),
        (LeaseView("other", NOW - timedelta(seconds=15), 15), Move.WAIT),
        (LeaseView("other", NOW - timedelta(seconds=16), 15), Move.TAKE_OVER),
        (LeaseView(None, None, 15), Move.TAKE_OVER),
    ],
)
def test_decide(lease: LeaseView | None, move: Move) -> None:
    assert decide(lease, "me", NOW) is move


def test_a_lease_as_the_api_sends_it() -> None:
    view = view_of(
        {
            "spec": {
                "holderIdentity": "pod-1",
                "renewTime": "2026-01-01T12:00:00.123456Z",
                "leaseDurationSeconds": 15,
            }
        }
    )
    assert view == LeaseView("pod-1", datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC), 15.0)
