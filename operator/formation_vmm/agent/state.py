"""What the agent knows of one VM and its domain, between deciding and reporting: the domain as
libvirt showed it, the desired state read from the VM, and the outcome of a sync. Pure."""

from dataclasses import dataclass, field
from datetime import datetime

from formation_vmm.agent.plan import Action, Actual, Desired, StopProgress
from formation_vmm.api.models import GuestOSInfo, VirtualMachine
from formation_vmm.api.names import RESTART_ELSEWHERE_ANNOTATION
from formation_vmm.domain.spec import Owner


@dataclass(frozen=True)
class DomainInfo:
    """A domain as libvirt reports it."""

    name: str
    uuid: str
    owner: Owner | None  # from the domain's <metadata>; None for a domain that is not ours
    actual: Actual
    vcpus: int
    memory_kib: int
    # Where its serial console is logged: an agent owns only domains whose files lie in its
    # own directories (another agent, another cluster, may share the libvirtd).
    console_log: str | None = None
    # libvirt's id of the running domain (None when it is not running): a new one each start,
    # so probe results of an earlier run never count for this one.
    run_id: int | None = None


@dataclass(frozen=True)
class Outcome:
    actions: list[Action]
    domain: DomainInfo | None
    spec_hash: str | None = None
    # MAC -> {source: IPv4} as libvirt reports them now (sources: lease, guest-agent)
    addresses: dict[str, dict[str, str]] = field(default_factory=dict)
    stopping: bool = False  # a graceful stop is under way
    requeue_after: float | None = None  # look again after this many seconds (a stop's deadline)
    restart_done: bool = False  # a requested restart was carried out by this sync
    guest_os: GuestOSInfo | None = None  # what the guest agent says of the OS, once it answers
    held: bool = False  # the spec asks for a change the controller has not admitted: not applied


def owner_of(vm: VirtualMachine) -> Owner:
    """The VM as domains and files on the node name it."""
    return Owner(namespace=vm.metadata.namespace or "", name=vm.metadata.name, uid=vm.metadata.uid or "")


def restart_requested(vm: VirtualMachine) -> bool:
    """spec.restartRequestedAt is newer than the last request carried out."""
    asked = vm.spec.restart_requested_at
    done = vm.status.last_restart_requested_at
    return asked is not None and (done is None or _aware(asked) > _aware(done))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.astimezone()


def desired_of(
    vm: VirtualMachine,
    deleting: bool,
    hash_: str | None = None,
    stop: StopProgress = StopProgress.NOT_ASKED,
    grace_seconds: float | None = None,
    held: bool = False,
) -> Desired:
    # A VM the controller restarts elsewhere is stopped here first, as a Halted one would be.
    evicted = RESTART_ELSEWHERE_ANNOTATION in vm.metadata.annotations
    return Desired(
        run_strategy="Halted" if evicted else vm.spec.run_strategy,
        paused=vm.spec.paused,
        deleting=deleting,
        has_run=vm.status.started_at is not None,
        restart_requested=restart_requested(vm),
        spec_hash=hash_,
        uid=vm.metadata.uid,
        grace_seconds=vm.spec.termination_grace_period_seconds if grace_seconds is None else grace_seconds,
        stop=stop,
        held=held,
    )


def stop_progress(deadline: float | None, now: float, nudge: float | None = None) -> StopProgress:
    """``deadline``: when the graceful stop asked at some earlier sync runs out (None: none);
    ``nudge``: when to ask the guest agent, if it has not been asked yet (None: asked)."""
    if deadline is None:
        return StopProgress.NOT_ASKED
    if now >= deadline:
        return StopProgress.EXPIRED
    return StopProgress.UNANSWERED if nudge is not None and now >= nudge else StopProgress.WAITING
