import pytest

from formation_vmm.agent.plan import Action, Actual, Desired, DomainState, ShutoffReason, phase_of, plan

pytestmark = pytest.mark.pure

A = Action
RUNNING = Actual(DomainState.RUNNING)
PAUSED = Actual(DomainState.PAUSED)
OFF = Actual(DomainState.SHUTOFF)
CRASHED_OFF = Actual(DomainState.SHUTOFF, ShutoffReason.CRASHED)
GUEST_OFF = Actual(DomainState.SHUTOFF, ShutoffReason.GUEST_SHUTDOWN)


@pytest.mark.parametrize(
    ("desired", "actual", "expected"),
    [
        (Desired("Always", False), None, [A.PREPARE_FILES, A.DEFINE, A.START]),
        (Desired("Always", True), None, [A.PREPARE_FILES, A.DEFINE, A.START, A.SUSPEND]),
        (Desired("Halted", False), None, [A.PREPARE_FILES, A.DEFINE]),
        (Desired("Always", False), RUNNING, []),
        (Desired("Always", True), RUNNING, [A.SUSPEND]),
        (Desired("Always", False), PAUSED, [A.RESUME]),
        (Desired("Halted", False), RUNNING, [A.SHUTDOWN]),
        (Desired("Halted", False), PAUSED, [A.SHUTDOWN]),
        (Desired("Halted", False), OFF, []),
        (Desired("Always", False, has_run=True), GUEST_OFF, [A.START]),
        (Desired("Always", False, has_run=True), CRASHED_OFF, [A.START]),
        (Desired("RerunOnFailure", False, has_run=True), CRASHED_OFF, [A.START]),
        (Desired("RerunOnFailure", False, has_run=True), GUEST_OFF, []),
        (Desired("Once", False, has_run=True), CRASHED_OFF, []),
        (Desired("Once", False, has_run=False), OFF, [A.START]),
        (Desired("Always", False, has_run=True), Actual(DomainState.CRASHED), [A.DESTROY, A.START]),
        (Desired("Always", False, deleting=True), RUNNING, [A.DESTROY, A.UNDEFINE, A.REMOVE_FILES]),
        (Desired("Always", False, deleting=True), OFF, [A.UNDEFINE, A.REMOVE_FILES]),
        (Desired("Always", False, deleting=True), None, [A.REMOVE_FILES]),
    ],
)
def test_plan(desired: Desired, actual: Actual | None, expected: list[Action]) -> None:
    assert plan(desired, actual) == expected


@pytest.mark.parametrize(
    ("actual", "phase"),
    [
        (None, "Provisioning"),
        (RUNNING, "Running"),
        (PAUSED, "Paused"),
        (OFF, "Stopped"),
        (CRASHED_OFF, "Failed"),
        (Actual(DomainState.SHUTTING_DOWN), "Stopping"),
    ],
)
def test_phase(actual: Actual | None, phase: str) -> None:
    assert phase_of(Desired("Always", False), actual) == phase


def test_deleting_is_terminating_whatever_the_domain() -> None:
    assert phase_of(Desired("Always", False, deleting=True), RUNNING) == "Terminating"


NEW = "hash-new"
OLD = "hash-old"


@pytest.mark.parametrize(
    ("desired", "actual", "expected"),
    [
        # A restart request reboots a running VM, and picks up a changed spec on the way.
        (
            Desired("Always", False, restart_requested=True, spec_hash=NEW),
            Actual(DomainState.RUNNING, spec_hash=NEW),
            [A.SHUTDOWN, A.START],
        ),
        (
            Desired("Always", False, restart_requested=True, spec_hash=NEW),
            Actual(DomainState.RUNNING, spec_hash=OLD),
            [A.SHUTDOWN, A.PREPARE_FILES, A.DEFINE, A.START],
        ),
        (Desired("Always", True, restart_requested=True), RUNNING, [A.SHUTDOWN, A.START, A.SUSPEND]),
        # Restarting a stopped VM is nothing to do.
        (Desired("Halted", False, restart_requested=True), OFF, []),
        # A changed spec on a running VM waits for a restart (status says RestartRequired).
        (Desired("Always", False, spec_hash=NEW), Actual(DomainState.RUNNING, spec_hash=OLD), []),
        # ... and is applied when the domain is stopped anyway.
        (
            Desired("Halted", False, spec_hash=NEW),
            Actual(DomainState.SHUTOFF, spec_hash=OLD),
            [A.PREPARE_FILES, A.DEFINE],
        ),
        (
            Desired("Always", False, has_run=True, spec_hash=NEW),
            Actual(DomainState.SHUTOFF, ShutoffReason.CRASHED, spec_hash=OLD),
            [A.PREPARE_FILES, A.DEFINE, A.START],
        ),
        # Destroyed behind our back counts as a failure.
        (
            Desired("RerunOnFailure", False, has_run=True),
            Actual(DomainState.SHUTOFF, ShutoffReason.DESTROYED),
            [A.START],
        ),
        (Desired("Once", False, has_run=True), Actual(DomainState.SHUTOFF, ShutoffReason.DESTROYED), []),
        # libvirt's own record says it ran, even when our status does not know yet.
        (Desired("Once", False, has_run=False), GUEST_OFF, []),
        (Desired("Halted", False), Actual(DomainState.SHUTTING_DOWN), [A.SHUTDOWN]),
        # Undefined behind our back while running: defined again, left running.
        (
            Desired("Always", False),
            Actual(DomainState.RUNNING, persistent=False),
            [A.PREPARE_FILES, A.DEFINE],
        ),
    ],
)
def test_plan_restarts_and_spec_changes(desired: Desired, actual: Actual, expected: list[Action]) -> None:
    assert plan(desired, actual) == expected
