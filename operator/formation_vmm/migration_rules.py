"""What a live migration may do, decided from what is known: pure, no I/O (docs/migration.md).

Whether a VM can move at all (the VM's LiveMigratable condition, and a VmMigration that fails
fast with its reason), whether a migration may start now under the cluster's limits, and when
a running one has taken too long or stopped progressing."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import NODE_LABEL

ACTIVE_PHASES = ("Pending", "Scheduling", "Preparing", "Migrating")
DONE_PHASES = ("Succeeded", "Failed", "Cancelled")
# Phases in which a migration holds one of the limited slots: its target is chosen, and the two
# nodes work on it.
SLOT_PHASES = ("Preparing", "Migrating")

GIB = 1 << 30


@dataclass(frozen=True)
class Refusal:
    reason: str  # CamelCase, for machines and the condition's reason
    message: str  # for the user


@dataclass(frozen=True)
class Limits:
    in_cluster: int = 5
    per_node: int = 2
    completion_timeout_per_gib: float = 150.0
    progress_timeout: float = 150.0
    # Slots one namespace's own migrations may hold at once (a drain's do not count): one tenant
    # cannot take every slot and hold up an admin's drain, or other tenants.
    per_namespace: int = 3


@dataclass(frozen=True)
class Slot:
    """A migration as the limits count it: where it leaves from, whose it is, and whether a
    drain made it (an admin's: it goes first, and counts against no namespace)."""

    source: str
    namespace: str
    drain: bool = False


def cannot_move(vm: VirtualMachine, snapshots: int) -> Refusal | None:
    """Why this VM cannot be live-migrated as it is now, or None. ``snapshots``: how many
    VmSnapshots of it exist (they live inside its disks, as qcow2 internal snapshots, which the
    copy leaves behind)."""
    name = vm.metadata.name
    if not vm.metadata.labels.get(NODE_LABEL):
        return Refusal("NotScheduled", f"VM {name} is not placed on a node yet")
    if vm.metadata.deletion_timestamp is not None:
        return Refusal("Terminating", f"VM {name} is being deleted")
    if vm.status.phase not in ("Running", "Paused"):
        return Refusal(
            "NotRunning",
            f"VM {name} is {vm.status.phase or 'not running'}; only a running VM moves live "
            "(a stopped VM starts on whichever node it is placed on)",
        )
    return not_live_migratable(vm, vm.spec.paused or vm.status.phase == "Paused", snapshots)


def not_live_migratable(vm: VirtualMachine, paused: bool, snapshots: int = 0) -> Refusal | None:
    """What in the VM itself keeps it from moving live (its LiveMigratable condition): a pause,
    a host bridge, UEFI, VmSnapshots (``snapshots``: how many exist; they live inside its disks,
    as qcow2 internal snapshots, which the copy leaves behind; a snapshot being taken is one)."""
    name = vm.metadata.name
    if paused:
        return Refusal("Paused", f"VM {name} is paused; resume it to move it")
    bridged = [n.name for n in vm.spec.networks if n.bridge]
    if bridged:
        return Refusal(
            "HostBridge",
            f"interface {bridged[0]} of VM {name} is on a host bridge: its layer 2 segment is the "
            "node's, and another node's bridge of that name may be another network",
        )
    if vm.spec.firmware.type == "efi":
        return Refusal(
            "UefiNvram",
            f"VM {name} boots with UEFI, and its NVRAM file is not copied by a live migration yet",
        )
    if snapshots:
        return Refusal(
            "HasSnapshots",
            f"VM {name} has {snapshots} VmSnapshot(s); they live inside its disks on node "
            f"{vm.metadata.labels.get(NODE_LABEL, '')} and would be left behind: delete them to move it",
        )
    return None


@dataclass(frozen=True)
class Verdict:
    """What becomes of a VmMigration asked for: its next phase (Failed, Pending, Scheduling or
    Preparing), why, and the target once it has one. ``note_on_vm``: whether the VM's status
    may carry this outcome (not when another migration of the VM owns it)."""

    phase: Literal["Failed", "Pending", "Scheduling", "Preparing"]
    reason: str | None
    message: str
    target: str | None = None
    note_on_vm: bool = True


def schedule(
    vm: VirtualMachine | None,
    vm_name: str,
    namespace: str,
    older: str | None,
    refusal: "Callable[[], Refusal | None]",
    wanted: str | None,
    wanted_refusal: "Callable[[], str | None]",
    wait: "Callable[[], str | None]",
    target: "Callable[[], tuple[str | None, str]]",
) -> Verdict:
    """One VmMigration's next step, from what is known of it: its VM (None: gone), ``older``
    (another unfinished migration of the VM, made before this one), and, asked for only when
    the decision gets that far (each costs a lookup), why the VM cannot move, why the node the
    user named takes no migration, why no slot is free, and the target placement finds (or
    None and why not). A request's own faults are said whatever the order in which requests
    made together are decided; only then does an older migration win."""
    if vm is None:
        return Verdict(
            "Failed", "VmNotFound", f"VM {vm_name} does not exist in namespace {namespace}", note_on_vm=False
        )
    if vm.status.phase == "Migrating":
        if older is None:  # its last migration ended a moment ago: the target has yet to say Running
            return Verdict("Pending", "VmSettling", f"VM {vm_name} is settling after its last migration")
        return _already(vm_name, older)
    refused = refusal()
    if refused is not None:
        return Verdict("Failed", refused.reason, refused.message)
    if wanted:
        bad = wanted_refusal()
        if bad is not None:
            return Verdict("Failed", "BadTarget", bad)
    if older is not None:
        return _already(vm_name, older)
    why = wait()
    if why is not None:
        return Verdict("Pending", "LimitReached", why)
    node, message = target()
    if node is None:
        return Verdict("Scheduling", "NoTarget", message)
    return Verdict("Preparing", None, f"node {node} prepares the VM's disks and domain", target=node)


def _already(vm_name: str, older: str) -> Verdict:
    return Verdict(
        "Failed", "AlreadyMigrating", f"VM {vm_name} is being moved by VmMigration {older}", note_on_vm=False
    )


def slot_wait(asked: Slot, busy: list[Slot], limits: Limits, drains_waiting: int = 0) -> str | None:
    """Why migration ``asked`` must wait, or None: ``busy`` hold a slot now, and
    ``drains_waiting`` drain migrations wait for one (they go first)."""
    if len(busy) >= limits.in_cluster:
        return f"{len(busy)} migrations run in the cluster, the most allowed at once; this one waits its turn"
    out = sum(1 for slot in busy if slot.source == asked.source)
    if out >= limits.per_node:
        return (
            f"{out} migrations leave node {asked.source}, the most allowed at once; this one waits its turn"
        )
    if asked.drain:
        return None
    if drains_waiting:
        return (
            f"{drains_waiting} migrations of a node's drain wait for a slot and go first; "
            "this one waits its turn"
        )
    mine = sum(1 for slot in busy if slot.namespace == asked.namespace and not slot.drain)
    if mine >= limits.per_namespace:
        return (
            f"{mine} migrations of namespace {asked.namespace} run, the most one namespace may run at "
            "once; this one waits its turn"
        )
    return None


def completion_timeout(limits: Limits, memory_bytes: int, disk_bytes: int) -> float:
    """Seconds a migration may take in all: per GiB of what it copies (at least one GiB)."""
    return limits.completion_timeout_per_gib * max((memory_bytes + disk_bytes) / GIB, 1.0)


def target_deadline(limits: Limits, memory_bytes: int, disk_bytes: int) -> float:
    """Seconds after a VmMigration was made past which its target carries none of its streams,
    whatever the source (or the status it writes) says: the copy's whole allowance, and one
    progress timeout for the preparing before it. The target's own clock and the apiserver's
    creationTimestamp: nothing the source can move."""
    return completion_timeout(limits, memory_bytes, disk_bytes) + limits.progress_timeout


@dataclass
class ProgressWatch:
    """Follows a running copy: when it last made progress (what is left went down)."""

    started: float
    last_progress: float
    least_remaining: int | None = None

    def observe(self, now: float, remaining: int) -> None:
        if self.least_remaining is None or remaining < self.least_remaining:
            self.least_remaining = remaining
            self.last_progress = now

    def overdue(self, now: float, limits: Limits, completion: float) -> str | None:
        """Why the copy must be cancelled now, or None."""
        if now - self.started > completion:
            return f"the migration did not complete within {completion:.0f}s (completionTimeoutPerGiB)"
        if now - self.last_progress > limits.progress_timeout:
            return f"the migration made no progress for {limits.progress_timeout:.0f}s (progressTimeout)"
        return None


def progress_summary(memory_remaining: int, memory_total: int, disk_remaining: int) -> str:
    mib = 1 << 20
    text = f"{memory_remaining // mib}Mi of {memory_total // mib}Mi memory left"
    if disk_remaining:
        text += f", {disk_remaining // mib}Mi of disk"
    return text


@dataclass(frozen=True)
class Eviction:
    """What a drain does with one VM of the node now: ``migrate`` it (a new VmMigration),
    ``wait`` for its migration under way, ``restart`` it elsewhere (stop it here, then bind it to
    another node, which starts it from its images), or it ``stays`` (the message says why)."""

    action: Literal["migrate", "wait", "restart", "stay"]
    message: str


def eviction(vm: VirtualMachine, default: str, snapshots: int, migration: str | None) -> Eviction:
    """The drain's decision for ``vm``: its evictionStrategy (else the cluster's ``default``),
    whether it can move, and the phase of its unfinished migration, if any."""
    strategy = vm.spec.eviction_strategy or default
    if strategy == "None":
        return Eviction("stay", "evictionStrategy None: it stays on the node")
    if migration in ACTIVE_PHASES:
        return Eviction("wait", f"moving ({migration})")
    if strategy == "Restart":
        return _restart(vm, snapshots, "evictionStrategy Restart")
    refusal = cannot_move(vm, snapshots)
    if refusal is None:
        return Eviction("migrate", "moving")
    if strategy == "LiveMigrate":
        return Eviction("stay", f"blocks the drain: {refusal.message}")
    return _restart(vm, snapshots, f"it cannot move live ({refusal.message})")


def _restart(vm: VirtualMachine, snapshots: int, why: str) -> Eviction:
    refusal = cannot_restart_elsewhere(vm, snapshots)
    if refusal is not None:
        return Eviction("stay", f"{why}, and {refusal.message}: it stays")
    return Eviction("restart", f"{why}: stopping it, to start it on another node")


def cannot_restart_elsewhere(vm: VirtualMachine, snapshots: int) -> Refusal | None:
    """Why this VM may not be started on another node from its images, or None. Its disks are
    overlays local to its node: a restart elsewhere starts from the images and loses what the
    guest wrote, so the VM's owner must allow it (``spec.allowDiskLoss``)."""
    if not vm.spec.allow_disk_loss:
        return Refusal(
            "DiskLossNotAllowed",
            "a restart on another node would lose what its guest wrote to its local disks "
            "(set spec.allowDiskLoss: true to allow it)",
        )
    if snapshots:
        return Refusal(
            "HasSnapshots",
            f"its {snapshots} VmSnapshot(s) live inside its disks on this node: delete them first",
        )
    return None


def restart_after_node_loss(vm: VirtualMachine, default: str) -> Refusal | None:
    """Why a VM of a node given up for lost (silent, and deleted or marked out of service by an
    admin) is not started elsewhere, or None. Its snapshots went with the node's disks."""
    strategy = vm.spec.eviction_strategy or default
    if strategy == "None":
        return Refusal("EvictionStrategyNone", "its evictionStrategy is None: it waits for its node")
    refusal = cannot_restart_elsewhere(vm, 0)
    if refusal is not None:
        return Refusal(refusal.reason, f"{refusal.message}; it waits for its node")
    return None
