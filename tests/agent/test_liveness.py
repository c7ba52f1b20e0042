"""A failed liveness probe kills the guest (the plan restarts it per runStrategy), unless it is
being stopped or migrated."""

import pytest

from formation_vmm.agent.probes.liveness import LivenessView, Move, decide

pytestmark = pytest.mark.pure

FAILED = "liveness probe tcp 22 failed 3 times: refused"


@pytest.mark.parametrize(
    ("view", "move"),
    [
        (LivenessView(None, stopping=False, migrating=False), Move.KEEP),
        (LivenessView(FAILED, stopping=False, migrating=False), Move.KILL),
        (LivenessView(FAILED, stopping=True, migrating=False), Move.KEEP),
        (LivenessView(FAILED, stopping=False, migrating=True), Move.KEEP),
        (LivenessView(None, stopping=True, migrating=True), Move.KEEP),
    ],
)
def test_decide(view: LivenessView, move: Move) -> None:
    assert decide(view) is move
