"""Carry out a plan on the node: the thin layer between ``plan`` and libvirt / the filesystem."""

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from formation_vmm.agent import files
from formation_vmm.agent.hypervisor import DomainInfo, Hypervisor
from formation_vmm.agent.inputs import Inputs
from formation_vmm.agent.plan import Action, Desired, DomainState, plan
from formation_vmm.agent.seed import write_seed
from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.quantity import parse_quantity
from formation_vmm.domain.build import build_domain_spec
from formation_vmm.domain.cloudinit import seed_files
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from formation_vmm.domain.spec import BaseImage, DomainSpec
from formation_vmm.domain.xml import domain_xml, spec_hash

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    actions: list[Action]
    domain: DomainInfo | None
    spec_hash: str | None = None
    addresses: dict[str, str] = field(default_factory=dict)  # MAC -> IPv4


class NoInputs:
    """For VMs that need no image files and no user data from the cluster (tests, test:///)."""

    def images(self, vm: VirtualMachine) -> dict[str, BaseImage]:
        return {}

    def user_data(self, vm: VirtualMachine) -> str:
        return vm.spec.cloud_init.user_data or "" if vm.spec.cloud_init else ""


def restart_requested(vm: VirtualMachine) -> bool:
    """spec.restartRequestedAt is newer than the last request carried out."""
    asked = vm.spec.restart_requested_at
    done = vm.status.last_restart_requested_at
    return asked is not None and (done is None or _aware(asked) > _aware(done))


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.astimezone()


def desired_of(vm: VirtualMachine, deleting: bool, hash_: str | None = None) -> Desired:
    return Desired(
        run_strategy=vm.spec.run_strategy,
        paused=vm.spec.paused,
        deleting=deleting,
        has_run=vm.status.started_at is not None,
        restart_requested=restart_requested(vm),
        spec_hash=hash_,
    )


class Reconciler:
    def __init__(
        self, hypervisor: Hypervisor, layout: NodeLayout, domain_type: str, inputs: Inputs | None = None
    ) -> None:
        self.hypervisor = hypervisor
        self.layout = layout
        self.domain_type = domain_type
        self.inputs: Inputs = inputs or NoInputs()
        self._sizes: dict[Path, int] = {}  # disk -> virtual size, as last read or set

    def desired_spec(self, vm: VirtualMachine, images: dict[str, BaseImage] | None = None) -> DomainSpec:
        """The domain the VM asks for; raises when an input is not ready or the spec is unusable."""
        images = self.inputs.images(vm) if images is None else images
        return build_domain_spec(vm, self.layout, self.domain_type, images)

    def reconcile(
        self,
        vm: VirtualMachine,
        deleting: bool = False,
        grace_seconds: float | None = None,
        dry_run: bool = False,
    ) -> Outcome:
        """Plan and act. With ``dry_run``, only plan: the actions it would take, and the domain
        as it is."""
        meta = vm.metadata
        name = domain_name(meta.namespace or "", meta.name)
        current = self.hypervisor.describe(name)
        if current is not None and current.owner is not None and current.owner.uid != meta.uid:
            # A domain of that name belongs to an older VM of the same name: it is not ours to
            # reuse, but it is ours to remove (its VM is gone, or this name would not be free).
            if dry_run:
                return Outcome([Action.DESTROY, Action.UNDEFINE], current)
            self.hypervisor.destroy(name)
            self.hypervisor.undefine(name)
            current = None
        images = {} if deleting else self.inputs.images(vm)
        spec = None if deleting else self.desired_spec(vm, images)
        if spec is not None and current is not None:
            # Redefining a domain must keep its UUID, or libvirt refuses the name as taken.
            spec = replace(spec, uuid=current.uuid)
        digest = spec_hash(spec) if spec is not None else None
        actions = plan(desired_of(vm, deleting, digest), current.actual if current else None)
        if dry_run:
            return Outcome(actions, current, digest, self._addresses(vm, current))
        grace = vm.spec.termination_grace_period_seconds if grace_seconds is None else grace_seconds
        for action in actions:
            self._act(action, vm, name, spec, grace, images)
        after = self.hypervisor.describe(name)
        if after is not None and not deleting:
            self._grow_disks(vm, name, after, images)
        return Outcome(actions, after, digest, self._addresses(vm, after))

    def _addresses(self, vm: VirtualMachine, domain: DomainInfo | None) -> dict[str, str]:
        if domain is None or domain.actual.state is not DomainState.RUNNING or not vm.spec.networks:
            return {}
        return self.hypervisor.addresses(domain.name)

    def _grow_disks(
        self, vm: VirtualMachine, name: str, domain: DomainInfo, images: dict[str, BaseImage]
    ) -> None:
        """A disk whose ``size`` went up grows: live through libvirt while QEMU runs, else with
        qemu-img. A smaller size is refused by the CRD; a size below the image is InvalidSpec."""
        namespace = vm.metadata.namespace or ""
        for disk in vm.spec.disks:
            if disk.size is None:
                continue
            path = self.layout.disk_path(namespace, vm.metadata.name, disk.name)
            if not path.exists():
                continue
            wanted = parse_quantity(disk.size)
            known = self._sizes.get(path)
            if known is None:
                known = self._sizes[path] = files.virtual_size(path)
            if wanted <= known:
                continue
            log.info("%s/%s: growing disk %s to %d bytes", namespace, vm.metadata.name, disk.name, wanted)
            if domain.actual.active and self.hypervisor.live_block_ops:
                self.hypervisor.block_resize(name, str(path), wanted)
            else:
                files.resize_offline(path, wanted)
            self._sizes[path] = wanted

    def _act(
        self,
        action: Action,
        vm: VirtualMachine,
        name: str,
        spec: DomainSpec | None,
        grace: float,
        images: dict[str, BaseImage],
    ) -> None:
        namespace = vm.metadata.namespace or ""
        log.info("%s/%s: %s", namespace, vm.metadata.name, action.value)
        if action is Action.PREPARE_FILES:
            assert spec is not None
            sizes = {d.name: d.size for d in vm.spec.disks if d.size is not None}
            bases = {d.name: images[d.image] for d in vm.spec.disks if d.image and d.image in images}
            files.prepare(spec, sizes, self.layout.vm_dir, self.layout.disks_dir, bases)
            if vm.spec.cloud_init is not None:
                write_seed(
                    self.layout.seed_path(namespace, vm.metadata.name),
                    seed_files(vm, self.inputs.user_data(vm)),
                )
        elif action is Action.DEFINE:
            assert spec is not None
            self.hypervisor.define(domain_xml(spec))
        elif action is Action.START:
            self.hypervisor.start(name)
        elif action is Action.SUSPEND:
            self.hypervisor.suspend(name)
        elif action is Action.RESUME:
            self.hypervisor.resume(name)
        elif action is Action.SHUTDOWN:
            self._shutdown(name, grace)
        elif action is Action.DESTROY:
            self.hypervisor.destroy(name)
        elif action is Action.UNDEFINE:
            self.hypervisor.undefine(name)
        elif action is Action.REMOVE_FILES:
            files.remove_tree(self.layout.vm_dir, self.layout.runtime_dir(namespace, vm.metadata.name))
            disk_dir = self.layout.disk_dir(namespace, vm.metadata.name)
            files.remove_tree(self.layout.disks_dir, disk_dir)
            for path in [p for p in self._sizes if p.parent == disk_dir]:
                self._sizes.pop(path, None)

    def _shutdown(self, name: str, grace_seconds: float) -> None:
        """ACPI shutdown, then a hard stop once the grace period is over."""
        if grace_seconds > 0:
            self.hypervisor.shutdown(name)
            deadline = time.monotonic() + grace_seconds
            while time.monotonic() < deadline:
                info = self.hypervisor.describe(name)
                if info is None or info.actual.state is DomainState.SHUTOFF:
                    return
                time.sleep(0.2)
        self.hypervisor.destroy(name)
