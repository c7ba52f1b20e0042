"""Carry out a plan on the node: the thin layer between ``plan`` and libvirt / the filesystem."""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from formation_vmm.agent import files
from formation_vmm.agent.hypervisor import DomainInfo, Hypervisor
from formation_vmm.agent.plan import Action, Actual, Desired, DomainState, plan
from formation_vmm.api.models import VirtualMachine
from formation_vmm.domain.build import build_domain_spec
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from formation_vmm.domain.xml import domain_xml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    actions: list[Action]
    domain: DomainInfo | None


def desired_of(vm: VirtualMachine, deleting: bool) -> Desired:
    return Desired(
        run_strategy=vm.spec.run_strategy,
        paused=vm.spec.paused,
        deleting=deleting,
        has_run=vm.status.started_at is not None,
    )


class Reconciler:
    def __init__(self, hypervisor: Hypervisor, layout: NodeLayout, domain_type: str) -> None:
        self.hypervisor = hypervisor
        self.layout = layout
        self.domain_type = domain_type

    def reconcile(
        self, vm: VirtualMachine, deleting: bool = False, grace_seconds: float | None = None
    ) -> Outcome:
        meta = vm.metadata
        namespace = meta.namespace or ""
        name = domain_name(namespace, meta.name)
        current = self.hypervisor.describe(name)
        if current is not None and current.owner is not None and current.owner.uid != meta.uid:
            # A domain of that name belongs to an older VM of the same name: it is not ours to
            # reuse, but it is ours to remove (its VM is gone, or this name would not be free).
            self.hypervisor.destroy(name)
            self.hypervisor.undefine(name)
            current = None
        desired = desired_of(vm, deleting)
        actions = plan(desired, current.actual if current else None)
        for action in actions:
            self._act(action, vm, name, grace_seconds)
        return Outcome(actions, self.hypervisor.describe(name))

    def _act(self, action: Action, vm: VirtualMachine, name: str, grace_seconds: float | None) -> None:
        namespace = vm.metadata.namespace or ""
        log.info("%s/%s: %s", namespace, vm.metadata.name, action.value)
        if action is Action.PREPARE_FILES:
            spec = build_domain_spec(vm, self.layout, self.domain_type)
            sizes = {d.name: d.size for d in vm.spec.disks if d.size is not None}
            files.prepare(spec, sizes, self.layout.vm_dir, self.layout.disks_dir)
        elif action is Action.DEFINE:
            self.hypervisor.define(domain_xml(build_domain_spec(vm, self.layout, self.domain_type)))
        elif action is Action.START:
            self.hypervisor.start(name)
        elif action is Action.SUSPEND:
            self.hypervisor.suspend(name)
        elif action is Action.RESUME:
            self.hypervisor.resume(name)
        elif action is Action.SHUTDOWN:
            self._shutdown(
                name, vm.spec.termination_grace_period_seconds if grace_seconds is None else grace_seconds
            )
        elif action is Action.DESTROY:
            self.hypervisor.destroy(name)
        elif action is Action.UNDEFINE:
            self.hypervisor.undefine(name)
        elif action is Action.REMOVE_FILES:
            files.remove_tree(self.layout.vm_dir, self.layout.runtime_dir(namespace, vm.metadata.name))
            files.remove_tree(self.layout.disks_dir, self.layout.disk_dir(namespace, vm.metadata.name))

    def _shutdown(self, name: str, grace_seconds: float) -> None:
        """ACPI shutdown, then a hard stop once the grace period is over."""
        self.hypervisor.shutdown(name)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            info = self.hypervisor.describe(name)
            if info is None or info.actual.state is DomainState.SHUTOFF:
                return
            time.sleep(0.2)
        self.hypervisor.destroy(name)


def is_active(actual: Actual | None) -> bool:
    return actual is not None and actual.state in (DomainState.RUNNING, DomainState.PAUSED)


def console_path(layout: NodeLayout, vm: VirtualMachine) -> Path:
    return layout.console_log(vm.metadata.namespace or "", vm.metadata.name)
