"""Carry out a plan on the node: the thin layer between ``plan`` and libvirt / the filesystem."""

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.hypervisor.guest_agent import guest_os_info
from formation_vmm.agent.plan import Action, Desired, DomainState, plan, restart_done
from formation_vmm.agent.state import DomainInfo, Outcome, desired_of, owner_of, stop_progress
from formation_vmm.agent.vms import files
from formation_vmm.agent.vms.disks import disk_growth
from formation_vmm.agent.vms.echoes import Echoes
from formation_vmm.agent.vms.inputs import InputNotReadyError, Inputs
from formation_vmm.agent.vms.seed import write_seed
from formation_vmm.api.admission import change_held
from formation_vmm.api.models import GuestOSInfo, VirtualMachine
from formation_vmm.api.quantity import parse_quantity
from formation_vmm.domain.build import build_domain_spec
from formation_vmm.domain.cloudinit import seed_files
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from formation_vmm.domain.spec import BaseImage, DomainSpec, NodeFirmware
from formation_vmm.domain.xml import domain_xml, spec_hash
from formation_vmm.host.paths import remove_tree
from formation_vmm.qemu_uids import qemu_owner

log = logging.getLogger(__name__)


def remove_vm_dir(base: Path, path: Path) -> None:
    """Remove a VM's directory (``<ns>/<name>/<uid>``), then its name's directory if that was
    the last uid in it."""
    remove_tree(base, path)
    with contextlib.suppress(OSError):  # not empty: a newer VM of that name lives there
        path.parent.rmdir()


Clock = Callable[[], float]


class VmNetworks(Protocol):
    """The node's networks, as a VM's sync needs them (agent/networks/node_networks.py)."""

    def require(self, vm: VirtualMachine) -> None: ...

    def release(self, vm: VirtualMachine) -> None: ...


@dataclass(frozen=True)
class Decided:
    """A plan made from one version of a VM and the domain as it was: what ``carry_out`` does."""

    name: str
    uid: str
    current: DomainInfo | None
    images: dict[str, BaseImage]
    spec: DomainSpec | None
    digest: str | None
    desired: Desired
    actions: list[Action]
    change_waits: bool
    deleting: bool
    now: float


class Reconciler:
    def __init__(
        self,
        hypervisor: Hypervisor,
        layout: NodeLayout,
        domain_type: str,
        inputs: Inputs,
        clock: Clock = time.monotonic,
        networks: VmNetworks | None = None,
        firmware: NodeFirmware | None = None,
        echoes: Echoes | None = None,
        qemu_gid: int | None = None,
        qemu_uids: bool = True,
    ) -> None:
        """``qemu_uids``: whether each VM's QEMU runs as the uid the controller recorded for it
        (qemu_uids.py; the agent's start says why not when not); ``qemu_gid``: the group it runs
        in beside that uid (the group that owns the node's /dev/kvm, so QEMU can open it; None:
        the VM's uid as its group)."""
        self.hypervisor = hypervisor
        self.qemu_gid = qemu_gid
        self.qemu_uids = qemu_uids
        self.echoes = echoes or Echoes()  # told of each call whose lifecycle event only echoes it
        self.layout = layout
        self.domain_type = domain_type
        self.inputs = inputs
        self.clock = clock
        self.networks = networks
        self.firmware = firmware or NodeFirmware()
        self._sizes: dict[Path, int] = {}  # disk -> virtual size, as last read or set
        # VM uid -> when its graceful stop runs out. In memory: a restarted agent sends the ACPI
        # request again and gives the guest a fresh grace period.
        self._deadlines: dict[str, float] = {}
        # VM uid -> when to ask the guest agent to power off a guest that ignores ACPI: half
        # the grace period; removed once asked.
        self._nudges: dict[str, float] = {}
        # Domain name -> (run id, what its guest agent said of its OS): asked until it answers,
        # then once per run (an OS changes only across a reboot).
        self._os_info: dict[str, tuple[int, GuestOSInfo]] = {}
        self._lock = threading.Lock()

    def desired_spec(self, vm: VirtualMachine, images: dict[str, BaseImage]) -> DomainSpec:
        """The domain the VM asks for; raises when an input is not ready or the spec is unusable."""
        spec = build_domain_spec(
            vm, self.layout, self.domain_type, images, self.firmware, self.qemu_owner(vm)
        )
        if spec.firmware is not None:
            missing = [str(path) for path in spec.firmware.files() if not path.is_file()]
            if missing:
                raise InputNotReadyError(
                    "FirmwareMissing",
                    f"firmware {', '.join(missing)} is missing on this node (Debian's ovmf package "
                    "provides UEFI; VMM_KERNEL_PATH and VMM_EFI_* name other files)",
                )
        return spec

    def _deadline(self, uid: str) -> float | None:
        with self._lock:
            return self._deadlines.get(uid)

    def _set_deadline(self, uid: str, deadline: float | None, nudge: float | None = None) -> None:
        with self._lock:
            if deadline is None:
                self._deadlines.pop(uid, None)
                self._nudges.pop(uid, None)
            elif uid not in self._deadlines:
                self._deadlines[uid] = deadline
                if nudge is not None:
                    self._nudges[uid] = nudge

    def _nudge(self, uid: str) -> float | None:
        with self._lock:
            return self._nudges.get(uid)

    def _nudged(self, uid: str) -> None:
        with self._lock:
            self._nudges.pop(uid, None)

    def reconcile(
        self,
        vm: VirtualMachine,
        deleting: bool = False,
        grace_seconds: float | None = None,
        decided: Decided | None = None,
    ) -> Outcome:
        """Plan and act: the plan ``decided`` already (from this very version of the VM), or a
        new one."""
        return self.carry_out(vm, decided or self.decide(vm, deleting, grace_seconds))

    def decide(
        self, vm: VirtualMachine, deleting: bool = False, grace_seconds: float | None = None
    ) -> Decided:
        """The domain as it is, and what to do with it; nothing done yet."""
        meta = vm.metadata
        uid = meta.uid or ""
        name = domain_name(meta.namespace or "", meta.name)
        current = self.hypervisor.describe(name)
        if current is None or not current.actual.active:
            self._set_deadline(uid, None)  # whatever stop was under way is over
        # A change the controller has not admitted (api/admission.py) is not applied: the
        # domain stays as it was defined, and nothing the new spec names is fetched or built.
        change_waits = not deleting and change_held(meta.annotations, vm.spec)
        images = {} if deleting or change_waits else self.inputs.images(vm)
        spec = None if deleting or change_waits else self.desired_spec(vm, images)
        ours = current is not None and (current.owner is None or current.owner.uid == uid)
        if spec is not None and current is not None and ours:
            # Redefining a domain must keep its UUID, or libvirt refuses the name as taken.
            spec = replace(spec, uuid=current.uuid)
        digest = spec_hash(spec) if spec is not None else None
        now = self.clock()
        held = not deleting and files.restore_held(self.layout, owner_of(vm))
        progress = stop_progress(self._deadline(uid), now, self._nudge(uid))
        desired = desired_of(vm, deleting, digest, progress, grace_seconds, held)
        actions = plan(desired, current.actual if current else None)
        if change_waits and Action.DEFINE in actions:
            raise InputNotReadyError(
                "ChangeHeld",
                "the domain must be defined anew, and the spec's change is not admitted yet (see "
                "condition SpecAccepted): the VM waits for it",
                "Ready",
            )
        return Decided(
            name, uid, current, images, spec, digest, desired, actions, change_waits, deleting, now
        )

    def preview(self, vm: VirtualMachine, decided: Decided) -> Outcome:
        """What carrying ``decided`` out would do, and the domain as it is: nothing done."""
        return Outcome(
            decided.actions,
            decided.current,
            decided.digest,
            self._addresses(vm, decided.current),
            guest_os=self._guest_os(decided.name, decided.current),
            held=decided.change_waits,
        )

    def carry_out(self, vm: VirtualMachine, d: Decided) -> Outcome:
        """Do what ``d`` says to the domain; ``vm``: the version acted for (the one ``d`` was
        made from)."""
        if self.networks is not None and (Action.DEFINE in d.actions or Action.START in d.actions):
            self.networks.require(vm)  # its networks run here and hand out its addresses
        for action in d.actions:
            with self.echoes.expecting(d.name, action.value):
                self._act(action, vm, d.name, d.spec, d.images)
            if action is Action.SHUTDOWN:
                grace = d.desired.grace_seconds
                self._set_deadline(d.uid, d.now + grace, d.now + grace / 2)
            elif action is Action.AGENT_SHUTDOWN:
                self._nudged(d.uid)
        after = self.hypervisor.describe(d.name)
        if (
            after is None
            or not after.actual.active
            or Action.DESTROY in d.actions
            or Action.START in d.actions
        ):
            self._set_deadline(d.uid, None)  # the stop is over (and a restart's new run has begun)
        if after is not None and not d.deleting and not d.change_waits:
            self._grow_disks(vm, d.name, after)
        deadline = self._deadline(d.uid)
        nudge = self._nudge(d.uid)
        wake = min(deadline, nudge) if deadline is not None and nudge is not None else deadline
        return Outcome(
            d.actions,
            after,
            d.digest,
            self._addresses(vm, after),
            stopping=deadline is not None,
            requeue_after=max(wake - self.clock(), 0.0) if wake is not None else None,
            restart_done=restart_done(d.desired, d.actions),
            guest_os=self._guest_os(d.name, after),
            held=d.change_waits,
        )

    def prepare_incoming(self, vm: VirtualMachine, uuid: str) -> None:
        """The target's side of a live migration: the VM's files made afresh (an overlay left
        from an earlier stay, or from a cut-short copy, would mix old blocks with the copied
        ones), its networks' entries, and its domain defined, stopped, under the source's UUID
        (libvirt lets a migration in onto a stopped definition of the same UUID). Raises
        InputNotReadyError while a base is still being fetched."""
        name = domain_name(vm.metadata.namespace or "", vm.metadata.name)
        images = self.inputs.images(vm)
        spec = replace(self.desired_spec(vm, images), uuid=uuid)
        self.remove_files(vm)
        if self.networks is not None:
            self.networks.require(vm)
        self._act(Action.PREPARE_FILES, vm, name, spec, images)
        self._act(Action.DEFINE, vm, name, spec, images)

    def remove_files(self, vm: VirtualMachine, release: bool = False) -> None:
        """The VM's files here (and with ``release``, its networks' entries): after it moved
        away, or when a migration to here did not happen."""
        if release and self.networks is not None:
            self.networks.release(vm)
        owner = owner_of(vm)
        remove_vm_dir(self.layout.vm_dir, self.layout.runtime_dir(owner))
        disk_dir = self.layout.disk_dir(owner)
        remove_vm_dir(self.layout.disks_dir, disk_dir)
        with self._lock:
            for path in [p for p in self._sizes if p.parent == disk_dir]:
                self._sizes.pop(path, None)

    def _hand_over(self, vm: VirtualMachine) -> None:
        """The VM's own files to its QEMU's uid (qemu_uids.py), before each start."""
        owner = owner_of(vm)
        own = [self.layout.runtime_dir(owner), self.layout.disk_dir(owner)]
        files.hand_over(own, self.qemu_owner(vm))

    def qemu_owner(self, vm: VirtualMachine) -> tuple[int, int] | None:
        """(uid, gid) the VM's QEMU runs as here; None: the node's QEMU user."""
        return qemu_owner(vm, self.qemu_gid) if self.qemu_uids else None

    def hard_stop(self, vm: VirtualMachine) -> None:
        """Stop the guest at once (its liveness probe failed): the next plan starts it again as
        after a crash, per runStrategy."""
        name = domain_name(vm.metadata.namespace or "", vm.metadata.name)
        metrics.ACTIONS.labels(Action.DESTROY.value).inc()
        self.hypervisor.destroy(name)
        self._set_deadline(vm.metadata.uid or "", None)

    def _addresses(self, vm: VirtualMachine, domain: DomainInfo | None) -> dict[str, dict[str, str]]:
        if domain is None or domain.actual.state is not DomainState.RUNNING or not vm.spec.networks:
            return {}
        return self.hypervisor.addresses(domain.name)

    def _guest_os(self, name: str, domain: DomainInfo | None) -> GuestOSInfo | None:
        """What the guest agent says of the running domain's OS. Until it answers, every sync
        asks (a guest without an agent fails at once; a busy agent is given a second)."""
        run = domain.run_id if domain is not None else None
        running = domain is not None and domain.actual.state is DomainState.RUNNING
        if not running or run is None or not self.hypervisor.runs_qemu:
            with self._lock:
                self._os_info.pop(name, None)  # stopped, or gone with its VM
            return None
        with self._lock:
            known = self._os_info.get(name)
        if known is not None and known[0] == run:
            return known[1]
        info = guest_os_info(self.hypervisor, name)
        if info is not None:
            with self._lock:
                self._os_info[name] = (run, info)
        return info

    def _grow_disks(self, vm: VirtualMachine, name: str, domain: DomainInfo) -> None:
        """A disk whose ``size`` went up grows (see ``disks.disk_growth``)."""
        namespace = vm.metadata.namespace or ""
        owner = owner_of(vm)
        paths = {d.name: self.layout.disk_path(owner, d.name) for d in vm.spec.disks}
        wanted = {d.name: parse_quantity(d.size) for d in vm.spec.disks if d.size is not None}
        current = {}
        for disk in wanted:
            path = paths[disk]
            if path.exists():
                if path not in self._sizes:
                    self._sizes[path] = files.virtual_size(path)
                current[disk] = self._sizes[path]
        for growth in disk_growth(wanted, current, domain.actual.active, self.hypervisor.runs_qemu):
            path = paths[growth.disk]
            log.info(
                "%s/%s: growing disk %s to %d bytes", namespace, vm.metadata.name, growth.disk, growth.size
            )
            if growth.live:
                self.hypervisor.block_resize(name, str(path), growth.size)
            else:
                files.resize_offline(path, growth.size)
            self._sizes[path] = growth.size

    def _act(
        self,
        action: Action,
        vm: VirtualMachine,
        name: str,
        spec: DomainSpec | None,
        images: dict[str, BaseImage],
    ) -> None:
        namespace = vm.metadata.namespace or ""
        log.info("%s/%s: %s", namespace, vm.metadata.name, action.value)
        metrics.ACTIONS.labels(action.value).inc()
        if action is Action.PREPARE_FILES:
            assert spec is not None
            sizes = {d.name: parse_quantity(d.size) for d in vm.spec.disks if d.size is not None}
            bases = {d.name: images[d.image] for d in vm.spec.disks if d.image and d.image in images}
            files.prepare(spec, sizes, self.layout.vm_dir, self.layout.disks_dir, bases)
            if vm.spec.cloud_init is not None:
                write_seed(
                    self.layout.seed_path(owner_of(vm)),
                    seed_files(vm, self.inputs.user_data(vm)),
                )
            self._hand_over(vm)
        elif action is Action.DEFINE:
            assert spec is not None
            self.hypervisor.define(domain_xml(spec))
        elif action is Action.START:
            self._hand_over(vm)  # files made or put back since (a restore's UEFI variables)
            self.hypervisor.start(name)
        elif action is Action.SUSPEND:
            self.hypervisor.suspend(name)
        elif action is Action.RESUME:
            self.hypervisor.resume(name)
        elif action is Action.SHUTDOWN:
            self.hypervisor.shutdown(name)
        elif action is Action.AGENT_SHUTDOWN:
            self.hypervisor.agent_shutdown(name)
        elif action is Action.DESTROY:
            self.hypervisor.destroy(name)
        elif action is Action.UNDEFINE:
            self.hypervisor.undefine(name)
        elif action is Action.REMOVE_FILES:
            self.remove_files(vm, release=True)
