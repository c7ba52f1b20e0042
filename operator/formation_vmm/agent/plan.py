"""Decide what to do with one VM's domain: ``plan(desired, actual) -> actions``. Pure.

The agent reads the VM (desired) and the domain (actual), calls ``plan``, and then performs the
actions in order. Keeping every decision here makes them testable without libvirt or Kubernetes.
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


class Action(Enum):
    PREPARE_FILES = "prepare-files"
    DEFINE = "define"
    START = "start"
    SUSPEND = "suspend"
    RESUME = "resume"
    SHUTDOWN = "shutdown"
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


@dataclass(frozen=True)
class Actual:
    state: DomainState
    reason: ShutoffReason = ShutoffReason.NEVER_STARTED
    spec_hash: str | None = None  # recorded in the domain's metadata when it was defined
    # False for a running domain someone undefined behind our back: it would vanish when it
    # stops, so it is defined again.
    persistent: bool = True

    @property
    def active(self) -> bool:
        return self.state in (DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTTING_DOWN)


def is_stale(desired: Desired, actual: Actual) -> bool:
    """The domain was defined from another spec than the one asked for now."""
    return desired.spec_hash is not None and actual.spec_hash != desired.spec_hash


def should_run(desired: Desired, actual: Actual | None) -> bool:
    """Whether the runStrategy wants the guest running, given how it last stopped."""
    strategy = desired.run_strategy
    if strategy == "Halted":
        return False
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


def plan(desired: Desired, actual: Actual | None) -> list[Action]:
    """The actions that take the domain from ``actual`` (None: not defined) to ``desired``."""
    if desired.deleting:
        if actual is None:
            return [Action.REMOVE_FILES]
        stop = [] if actual.state is DomainState.SHUTOFF else [Action.DESTROY]
        return [*stop, Action.UNDEFINE, Action.REMOVE_FILES]

    steps: list[Action] = []
    if actual is None:
        steps += [Action.PREPARE_FILES, Action.DEFINE]
        actual = Actual(DomainState.SHUTOFF, spec_hash=desired.spec_hash)
    elif not actual.persistent:
        steps += [Action.PREPARE_FILES, Action.DEFINE]
    run = should_run(desired, actual)
    state = actual.state
    restart = desired.restart_requested and actual.active and run
    if state is DomainState.CRASHED or (restart and state is DomainState.SHUTTING_DOWN):
        steps.append(Action.DESTROY)
    elif restart or (not run and actual.active):
        steps.append(Action.SHUTDOWN)
    if not run:
        # Keep a stopped domain's definition current, so `virsh dumpxml` tells the truth.
        if not actual.active and is_stale(desired, actual):
            steps += [Action.PREPARE_FILES, Action.DEFINE]
        return steps
    if restart or not actual.active:
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


def phase_of(desired: Desired, actual: Actual | None) -> VmPhase:
    """The phase a VM is in, given its domain as it is now (after the plan was carried out)."""
    if desired.deleting:
        return "Terminating"
    if actual is None:
        return "Provisioning"
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
