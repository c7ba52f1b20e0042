"""What a failed liveness probe does to a guest: a pure decision, shaped like
controller/leader.py's, so that VmSync only carries it out.

KubeVirt's semantics: a guest whose liveness probe failed is killed, and its runStrategy says
whether it starts again (``Always`` and ``RerunOnFailure`` do; the plan decides, as for any
stopped VM). A guest already being stopped, or in a live migration (the source's copy may be
the one running, and the target's takes over; a kill would break the move), is left alone:
its probes start afresh once it settles."""

from dataclasses import dataclass
from enum import Enum


class Move(Enum):
    KEEP = "keep"
    KILL = "kill"  # a hard stop; the plan then starts it again per runStrategy


@dataclass(frozen=True)
class LivenessView:
    failure: str | None  # why the probe failed in the guest's current run, or None
    stopping: bool  # a stop is under way (graceful shutdown, runStrategy Halted)
    migrating: bool  # the VM's phase says Migrating


def decide(view: LivenessView) -> Move:
    if view.failure is None or view.stopping or view.migrating:
        return Move.KEEP
    return Move.KILL
