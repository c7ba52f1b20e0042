"""The status the agent writes after syncing a VM: a model holding only the fields it changes.
Pure."""

from datetime import datetime
from typing import Any

from formation_vmm.agent.plan import Action, DomainState, phase_of
from formation_vmm.agent.state import Outcome, desired_of, restart_requested
from formation_vmm.api.conditions import now, set_condition
from formation_vmm.api.models import InterfaceStatus, VirtualMachine, VirtualMachineStatus, to_wire
from formation_vmm.domain.naming import stable_mac

RESTART_REQUIRED_MESSAGE = (
    "the spec changed in a way that needs a restart (CPU, memory, disks, kernel or networks); "
    "restart the VM to apply it (kubectl vm restart)"
)


def interfaces(vm: VirtualMachine, addresses: dict[str, str]) -> list[InterfaceStatus]:
    result = []
    for net in vm.spec.networks:
        mac = (net.mac_address or stable_mac(vm.metadata.uid or "", net.name)).lower()
        entry = InterfaceStatus(name=net.name, mac=mac)
        if mac in addresses:
            entry.ip_address = addresses[mac]
        result.append(entry)
    return result


def status_after(
    vm: VirtualMachine,
    old: VirtualMachineStatus,
    outcome: Outcome,
    node: str,
    at: datetime | None = None,
    deleting: bool = False,
) -> VirtualMachineStatus:
    """The status fields after the reconciler left the domain as ``outcome.domain``."""
    stamp = at or now()
    domain = outcome.domain
    actual = domain.actual if domain else None
    phase = phase_of(desired_of(vm, deleting=deleting), actual, outcome.stopping)
    gen = vm.metadata.generation
    state = actual.state if actual else None
    conditions = old.conditions
    ready = state is DomainState.RUNNING and phase == "Running"
    conditions = set_condition(
        conditions,
        "Ready",
        ready,
        "Running" if ready else f"Domain{phase}",
        f"the VM is {phase.lower()}",
        gen,
        stamp,
    )
    paused = state is DomainState.PAUSED
    conditions = set_condition(
        conditions, "Paused", paused, "PausedByUser" if paused else "NotPaused", "", gen, stamp
    )
    stale = actual is not None and actual.active and actual.spec_hash != outcome.spec_hash and not deleting
    conditions = set_condition(
        conditions,
        "RestartRequired",
        stale,
        "SpecChanged" if stale else "UpToDate",
        RESTART_REQUIRED_MESSAGE if stale else "",
        gen,
        stamp,
    )
    if not deleting:
        conditions = set_condition(conditions, "ImageReady", True, "ImagesReady", "", gen, stamp)
    fields = VirtualMachineStatus(
        phase=phase,
        node_name=node,
        observed_generation=gen,
        conditions=conditions,
        message=f"domain {domain.name} is {state.value}" if domain and state else "no domain",
        interfaces=interfaces(vm, outcome.addresses),
    )
    if domain is not None:
        fields.domain_uuid = domain.uuid
    if Action.START in outcome.actions:
        fields.started_at = stamp
        if old.started_at is not None:
            fields.restart_count = old.restart_count + 1
    if outcome.restart_done and restart_requested(vm):
        fields.last_restart_requested_at = vm.spec.restart_requested_at
    return fields


def status_waiting(
    vm: VirtualMachine, old: VirtualMachineStatus, reason: str, message: str
) -> VirtualMachineStatus:
    """The status of a VM whose images or secrets are not ready: it waits in Provisioning."""
    gen = vm.metadata.generation
    conditions = set_condition(old.conditions, "ImageReady", False, reason, message, gen)
    conditions = set_condition(conditions, "Ready", False, reason, message, gen)
    return VirtualMachineStatus(
        phase="Provisioning", message=message, observed_generation=gen, conditions=conditions
    )


def status_failed(
    vm: VirtualMachine, old: VirtualMachineStatus, reason: str, message: str
) -> VirtualMachineStatus:
    gen = vm.metadata.generation
    conditions = set_condition(old.conditions, "Ready", False, reason, message, gen)
    return VirtualMachineStatus(
        phase="Failed", message=message, observed_generation=gen, conditions=conditions
    )


def status_unknown(
    vm: VirtualMachine, old: VirtualMachineStatus, reason: str, message: str
) -> VirtualMachineStatus:
    """Nothing can be known of the domain right now (libvirtd unreachable): the phase stays as
    it was, Ready turns Unknown with the reason, and the agent keeps trying."""
    gen = vm.metadata.generation
    conditions = set_condition(old.conditions, "Ready", "Unknown", reason, message, gen)
    return VirtualMachineStatus(message=message, conditions=conditions)


def changes(old: dict[str, Any], fields: VirtualMachineStatus) -> dict[str, Any]:
    """The fields whose value differs from the status as read (its wire form): an empty result
    means no write."""
    return {key: value for key, value in to_wire(fields).items() if old.get(key) != value}
