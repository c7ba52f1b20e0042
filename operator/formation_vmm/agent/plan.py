"""Decide what to do with one VM's domain: ``plan(desired, actual) -> actions``. Pure.

The agent reads the VM (desired) and the domain (actual), calls ``plan``, and then performs the
actions in order. Keeping every decision here makes them testable without libvirt or Kubernetes.

A graceful stop (ACPI, then a hard stop after the grace period) never waits inside a plan: the
first plan asks for ``SHUTDOWN``; the agent records the deadline and syncs the VM again when the
guest stops or the deadline passes, and that later plan (``StopProgress``) destroys the domain if
it still runs. So no thread waits out a grace period.
"""

from dataclasses import dataclass
from enum import Enum

from formation_vmm.api.models import RunStrategy, VmPhase


class DomainState(Enum):
    """libvirt's domain states, folded to what decisions need."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    SHUTTING_DOWN = "shutting-down"
    OTHER = "other"


class ShutoffReason(Enum):
    """Why a domain is shut off: it decides whether a runStrategy restarts it."""

    NEVER_STARTED = "never-started"
    GUEST_SHUTDOWN = "guest-shutdown"
    CRASHED = "crashed"
    # Destroyed (hard-stopped): by us when a grace period ran out, or by someone else behind
    # our back. While the VM should run it counts as a failure.
    DESTROYED = "destroyed"


class StopProgress(Enum):
    """Where a graceful stop of a running domain stands."""

    NOT_ASKED = "not-asked"  # no ACPI shutdown sent yet
    WAITING = "waiting"  # sent; the guest has until the deadline
    # Half the grace period went by and the guest still runs: it may ignore ACPI (no logind, a
    # power key set to ignore); its guest agent, if it has one, can still power it off cleanly.
    UNANSWERED = "unanswered"
    EXPIRED = "expired"  # the deadline passed: stop it hard


class Action(Enum):
    PREPARE_FILES = "prepare-files"
    DEFINE = "define"
    START = "start"
    SUSPEND = "suspend"
    RESUME = "resume"
    SHUTDOWN = "shutdown"  # ACPI; the agent records the deadline
    AGENT_SHUTDOWN = "agent-shutdown"  # the guest agent's guest-shutdown, once per stop
    DESTROY = "destroy"
    UNDEFINE = "undefine"
    REMOVE_FILES = "remove-files"


@dataclass(frozen=True)
class Desired:
    run_strategy: RunStrategy
    paused: bool
    deleting: bool = False
    has_run: bool = False  # the VM has been started at least once (status.startedAt set)
    restart_requested: bool = False  # spec.restartRequestedAt is newer than the last one handled
    spec_hash: str | None = None  # of the domain the spec asks for; None: do not compare
    uid: str | None = None  # the VM's; a domain recorded for another uid is not this VM's
    grace_seconds: float = 30.0  # terminationGracePeriodSeconds
    stop: StopProgress = StopProgress.NOT_ASKED
    held: bool = False  # a restore of the VM's disks is under way: neither start nor stop it


@dataclass(frozen=True)
class Actual:
    state: DomainState
    reason: ShutoffReason = ShutoffReason.NEVER_STARTED
    spec_hash: str | None = None  # recorded in the domain's metadata when it was defined
    # False for a running domain someone undefined behind our back: it would vanish when it
    # stops, so it is defined again.
    persistent: bool = True
    owner_uid: str | None = None  # the VM uid recorded in the domain's metadata

    @property
    def active(self) -> bool:
        return self.state in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTTING_DOWN)


def is_stale(desired: Desired, actual: Actual) -> bool:
    """The domain was defined from another spec than the one asked for now."""
    return desired.spec_hash is not None and actual.spec_hash != desired.spec_hash


def is_foreign(desired: Desired, actual: Actual | None) -> bool:
    """A domain of this VM's name recorded for another uid. For a live VM it belonged to an
    older VM of the same name (deleted, or this name would not be free): not ours to reuse, ours
    to remove. For a VM being deleted it is a newer VM's: not ours at all."""
    return (
        actual is not None
        and desired.uid is not None
        and actual.owner_uid is not None
        and actual.owner_uid != desired.uid
    )


def should_run(desired: Desired, actual: Actual | None) -> bool:
    """Whether the runStrategy wants the guest running, given how it last stopped."""
    strategy = desired.run_strategy
    if strategy == "Halted":
        return False
    # A requested restart boots the guest again whatever stopped it.
    if desired.restart_requested:
        return True
    has_run = desired.has_run or (actual is not None and actual.reason is not ShutoffReason.NEVER_STARTED)
    if strategy == "Always" or not has_run:
        return True
    if actual is None or actual.state not in (DomainState.SHUTOFF, DomainState.CRASHED):
        return True  # it runs now; nothing to decide until it stops
    if strategy == "RerunOnFailure":
        return actual.state is DomainState.CRASHED or actual.reason in (
            ShutoffReason.CRASHED,
            ShutoffReason.DESTROYED,
        )
    return False  # Once: it ran, and stopped


def stop_steps(desired: Desired) -> list[Action]:
    """The next step of a graceful stop of an active domain: ACPI first, nothing while the guest
    has time, its guest agent's shutdown halfway through if it still runs, a hard stop once the
    grace period is over (at once when it is 0)."""
    if desired.grace_seconds <= 0 or desired.stop is StopProgress.EXPIRED:
        return [Action.DESTROY]
    if desired.stop is StopProgress.NOT_ASKED:
        return [Action.SHUTDOWN]
    if desired.stop is StopProgress.UNANSWERED:
        return [Action.AGENT_SHUTDOWN]
    return []


def plan(desired: Desired, actual: Actual | None) -> list[Action]:
    """The actions that take the domain from ``actual`` (None: not defined) to ``desired``."""
    if desired.deleting:
        # A domain of this name recorded for another uid is a newer VM's: never touched here.
        if actual is None or is_foreign(desired, actual):
            return [Action.REMOVE_FILES]
        if actual.state is DomainState.CRASHED:
            return [Action.DESTROY, Action.UNDEFINE, Action.REMOVE_FILES]
        if actual.active:
            stop = stop_steps(desired)
            if stop != [Action.DESTROY]:
                return stop  # the guest shuts down; the next sync undefines it
            return [*stop, Action.UNDEFINE, Action.REMOVE_FILES]
        return [Action.UNDEFINE, Action.REMOVE_FILES]

    steps: list[Action] = []
    if is_foreign(desired, actual):
        steps += [Action.DESTROY, Action.UNDEFINE]
        actual = None

    if actual is None:
        steps += [Action.PREPARE_FILES, Action.DEFINE]
        actual = Actual(DomainState.SHUTOFF, spec_hash=desired.spec_hash)
    elif not actual.persistent:
        steps += [Action.PREPARE_FILES, Action.DEFINE]
    if desired.held:
        return steps
    run = should_run(desired, actual)
    state = actual.state
    restart = desired.restart_requested and actual.active
    active = actual.active
    if state is DomainState.CRASHED:
        steps.append(Action.DESTROY)
    elif restart or (not run and active):
        stop = stop_steps(desired)
        steps += stop
        if stop != [Action.DESTROY]:
            return steps  # waiting for the guest to stop
        active = False
    if not run:
        # Keep a stopped domain's definition current, so `virsh dumpxml` tells the truth.
        if not active and is_stale(desired, actual):
            steps += [Action.PREPARE_FILES, Action.DEFINE]
        return steps
    if not active or state is DomainState.CRASHED:
        if is_stale(desired, actual):
            steps += [Action.PREPARE_FILES, Action.DEFINE]
        steps.append(Action.START)
        if desired.paused:
            steps.append(Action.SUSPEND)
    elif state is DomainState.RUNNING and desired.paused:
        steps.append(Action.SUSPEND)
    elif state is DomainState.PAUSED and not desired.paused:
        steps.append(Action.RESUME)
    return steps


def restart_done(desired: Desired, actions: list[Action]) -> bool:
    """A requested restart is carried out once the guest starts again (or at once for a Halted
    VM, which a restart does not start); only then is it recorded as handled."""
    return desired.restart_requested and (Action.START in actions or desired.run_strategy == "Halted")


def phase_of(desired: Desired, actual: Actual | None, stopping: bool = False) -> VmPhase:
    """The phase a VM is in, given its domain as it is now (after the plan was carried out);
    ``stopping``: a graceful stop is under way."""
    if desired.deleting:
        return "Terminating"
    if actual is None:
        return "Provisioning"
    if stopping and actual.active:
        return "Stopping"
    match actual.state:
        case DomainState.RUNNING:
            return "Running"
        case DomainState.PAUSED:
            return "Paused"
        case DomainState.SHUTTING_DOWN:
            return "Stopping"
        case DomainState.CRASHED:
            return "Failed"
        case DomainState.SHUTOFF:
            if actual.reason is ShutoffReason.CRASHED:
                return "Failed"
            return "Stopped"
    return "Unknown"
