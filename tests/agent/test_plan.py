"""``plan(desired, actual)``: every decision of the agent, as a table. Pure."""

import pytest

from formation_vmm.agent.plan import (
    Action,
    Actual,
    Desired,
    DomainState,
    ShutoffReason,
    StopProgress,
    phase_of,
    plan,
    restart_done,
)
from formation_vmm.agent.state import stop_progress

pytestmark = pytest.mark.pure

A = Action
RUNNING = Actual(DomainState.RUNNING, owner_uid="u1")
PAUSED = Actual(DomainState.PAUSED, owner_uid="u1")
OFF = Actual(DomainState.SHUTOFF, owner_uid="u1")
CRASHED_OFF = Actual(DomainState.SHUTOFF, ShutoffReason.CRASHED, owner_uid="u1")
GUEST_OFF = Actual(DomainState.SHUTOFF, ShutoffReason.GUEST_SHUTDOWN, owner_uid="u1")
DESTROYED_OFF = Actual(DomainState.SHUTOFF, ShutoffReason.DESTROYED, owner_uid="u1")
SHUTTING = Actual(DomainState.SHUTTING_DOWN, owner_uid="u1")
FOREIGN = Actual(DomainState.RUNNING, owner_uid="an-older-vm")
WAITING = StopProgress.WAITING
EXPIRED = StopProgress.EXPIRED
UNANSWERED = StopProgress.UNANSWERED


def want(strategy: str = "Always", paused: bool = False, **kw: object) -> Desired:
    return Desired(strategy, paused, uid="u1", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("desired", "actual", "expected"),
    [
        # Creating, pausing, resuming.
        (want(), None, [A.PREPARE_FILES, A.DEFINE, A.START]),
        (want(paused=True), None, [A.PREPARE_FILES, A.DEFINE, A.START, A.SUSPEND]),
        (want("Halted"), None, [A.PREPARE_FILES, A.DEFINE]),
        (want(), RUNNING, []),
        (want(paused=True), RUNNING, [A.SUSPEND]),
        (want(), PAUSED, [A.RESUME]),
        # A graceful stop: ACPI, then nothing while the guest has time, then a hard stop.
        (want("Halted"), RUNNING, [A.SHUTDOWN]),
        (want("Halted", stop=WAITING), RUNNING, []),
        (want("Halted", stop=EXPIRED), RUNNING, [A.DESTROY]),
        # Half the grace period and still running: its guest agent is asked, once.
        (want("Halted", stop=UNANSWERED), RUNNING, [A.AGENT_SHUTDOWN]),
        (want(deleting=True, stop=UNANSWERED), RUNNING, [A.AGENT_SHUTDOWN]),
        (want("Halted", grace_seconds=0), RUNNING, [A.DESTROY]),
        (want("Halted"), PAUSED, [A.SHUTDOWN]),
        (want("Halted", stop=WAITING), SHUTTING, []),
        (want("Halted"), OFF, []),
        # runStrategy after the guest stopped.
        (want(has_run=True), GUEST_OFF, [A.START]),
        (want(has_run=True), CRASHED_OFF, [A.START]),
        (want("RerunOnFailure", has_run=True), CRASHED_OFF, [A.START]),
        (want("RerunOnFailure", has_run=True), DESTROYED_OFF, [A.START]),
        (want("RerunOnFailure", has_run=True), GUEST_OFF, []),
        (want("Once", has_run=True), CRASHED_OFF, []),
        (want("Once", has_run=False), OFF, [A.START]),
        (want(has_run=True), Actual(DomainState.CRASHED, owner_uid="u1"), [A.DESTROY, A.START]),
        # A restart: stopped gracefully first, started once it is off, even where the strategy
        # alone would leave a cleanly stopped guest off.
        (want(restart_requested=True), RUNNING, [A.SHUTDOWN]),
        (want(restart_requested=True, stop=WAITING), RUNNING, []),
        (want(restart_requested=True, stop=EXPIRED), RUNNING, [A.DESTROY, A.START]),
        (want(restart_requested=True, grace_seconds=0), RUNNING, [A.DESTROY, A.START]),
        (want(restart_requested=True, has_run=True), GUEST_OFF, [A.START]),
        (want("RerunOnFailure", restart_requested=True, has_run=True), GUEST_OFF, [A.START]),
        (want("Halted", restart_requested=True), OFF, []),
        # A stale definition is replaced before a start, and kept current while stopped.
        (
            want(spec_hash="new", has_run=True),
            Actual(DomainState.SHUTOFF, spec_hash="new", owner_uid="u1"),
            [A.START],
        ),
        (
            want(spec_hash="new", has_run=True),
            Actual(DomainState.SHUTOFF, spec_hash="old", owner_uid="u1"),
            [A.PREPARE_FILES, A.DEFINE, A.START],
        ),
        (
            want("Halted", spec_hash="new"),
            Actual(DomainState.SHUTOFF, spec_hash="old", owner_uid="u1"),
            [A.PREPARE_FILES, A.DEFINE],
        ),
        (want(spec_hash="new"), Actual(DomainState.RUNNING, spec_hash="old", owner_uid="u1"), []),
        # Undefined behind our back while running: defined again.
        (want(), Actual(DomainState.RUNNING, persistent=False, owner_uid="u1"), [A.PREPARE_FILES, A.DEFINE]),
        # A domain of this name left by an older VM of the same name: replaced.
        (want(), FOREIGN, [A.DESTROY, A.UNDEFINE, A.PREPARE_FILES, A.DEFINE, A.START]),
        # A restore holds the VM: neither started nor stopped.
        (want(held=True, has_run=True), OFF, []),
        (want("Halted", held=True), RUNNING, []),
        # Deletion: the same graceful stop, then the domain and the files go.
        (want(deleting=True), RUNNING, [A.SHUTDOWN]),
        (want(deleting=True, stop=WAITING), RUNNING, []),
        (want(deleting=True, stop=EXPIRED), RUNNING, [A.DESTROY, A.UNDEFINE, A.REMOVE_FILES]),
        (want(deleting=True, grace_seconds=0), RUNNING, [A.DESTROY, A.UNDEFINE, A.REMOVE_FILES]),
        (want(deleting=True), OFF, [A.UNDEFINE, A.REMOVE_FILES]),
        (
            want(deleting=True),
            Actual(DomainState.CRASHED, owner_uid="u1"),
            [A.DESTROY, A.UNDEFINE, A.REMOVE_FILES],
        ),
        (want(deleting=True), None, [A.REMOVE_FILES]),
        # ... but a domain of that name recorded for another uid is a newer VM's: untouched.
        (want(deleting=True), FOREIGN, [A.REMOVE_FILES]),
    ],
)
def test_plan(desired: Desired, actual: Actual | None, expected: list[Action]) -> None:
    assert plan(desired, actual) == expected


@pytest.mark.parametrize(
    ("actual", "stopping", "phase"),
    [
        (None, False, "Provisioning"),
        (RUNNING, False, "Running"),
        (RUNNING, True, "Stopping"),
        (PAUSED, False, "Paused"),
        (OFF, False, "Stopped"),
        (OFF, True, "Stopped"),
        (CRASHED_OFF, False, "Failed"),
        (SHUTTING, False, "Stopping"),
    ],
)
def test_phase(actual: Actual | None, stopping: bool, phase: str) -> None:
    assert phase_of(want(), actual, stopping) == phase


def test_deleting_is_terminating_whatever_the_domain() -> None:
    assert phase_of(want(deleting=True), RUNNING) == "Terminating"


@pytest.mark.parametrize(
    ("deadline", "now", "nudge", "progress"),
    [
        (None, 5.0, None, StopProgress.NOT_ASKED),
        (10.0, 5.0, None, WAITING),
        (10.0, 10.0, None, EXPIRED),
        (10.0, 11.0, None, EXPIRED),
        (10.0, 4.0, 5.0, WAITING),  # before half the grace period
        (10.0, 5.0, 5.0, UNANSWERED),
        (10.0, 10.0, 5.0, EXPIRED),  # the deadline wins over an agent never asked
    ],
)
def test_stop_progress(
    deadline: float | None, now: float, nudge: float | None, progress: StopProgress
) -> None:
    assert stop_progress(deadline, now, nudge) is progress


@pytest.mark.parametrize(
    ("desired", "actions", "done"),
    [
        (want(restart_requested=True), [A.SHUTDOWN], False),  # not yet: the guest is still up
        (want(restart_requested=True), [A.DESTROY, A.START], True),
        (want("Halted", restart_requested=True), [], True),  # a stopped VM has nothing to restart
        (want(), [A.START], False),  # no restart was asked
    ],
)
def test_a_restart_is_recorded_as_done_only_once_the_guest_starts(
    desired: Desired, actions: list[Action], done: bool
) -> None:
    assert restart_done(desired, actions) is done
