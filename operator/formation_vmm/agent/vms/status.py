"""The status the agent writes after syncing a VM: a model holding only the fields it changes.
Pure."""

from datetime import datetime
from typing import Any

from formation_vmm.agent.plan import Action, DomainState, phase_of
from formation_vmm.agent.probes.probe_state import Readiness
from formation_vmm.agent.state import Outcome, desired_of, restart_requested
from formation_vmm.api.conditions import now, set_condition
from formation_vmm.api.models import InterfaceStatus, VirtualMachine, VirtualMachineStatus, to_wire
from formation_vmm.api.names import DEFAULT_NETWORK
from formation_vmm.domain.build import assigned_addresses, interface_mac
from formation_vmm.ipam import IPAM, from_ipam
from formation_vmm.migration_rules import not_live_migratable

RESTART_REQUIRED_MESSAGE = (
    "the spec changed in a way that needs a restart (CPU, memory, disks, kernel or networks); "
    "restart the VM to apply it (kubectl vm restart)"
)


def interfaces(
    vm: VirtualMachine, old: VirtualMachineStatus, observed: dict[str, dict[str, str]]
) -> tuple[list[InterfaceStatus], list[str]]:
    """The interfaces to show, and what contradicts an assignment. An address the controller
    assigned (the binding's addresses annotation) shows, with source ipam: a lease or the guest
    agent that agrees joins its infoSource, one that disagrees is reported, never shown in its
    place. Without an assignment (a bridge network) the lease's or the agent's address shows; a
    lookup that finds nothing (the guest has not asked yet, the domain stopped) keeps what was
    shown."""
    previous = {entry.name: entry for entry in old.interfaces}
    given = assigned_addresses(vm)
    result, contradictions = [], []
    for net in vm.spec.networks:
        mac = interface_mac(vm, net)
        entry = InterfaceStatus(name=net.name, mac=mac, network=net.network or DEFAULT_NETWORK)
        prev = previous.get(net.name)
        seen = observed.get(mac, {})
        address = given.get(net.name)
        if address:
            entry.ip_address = address
            agreeing = sorted(source for source, ip in seen.items() if ip == address)
            entry.info_source = ", ".join([IPAM, *agreeing])
            contradictions += [
                f"interface {net.name}: {source} reports {ip}, but {address} is assigned"
                for source, ip in sorted(seen.items())
                if ip != address
            ]
        elif seen:
            ip = seen.get("lease") or next(iter(seen.values()))
            entry.ip_address = ip
            entry.info_source = ", ".join(sorted(s for s, found in seen.items() if found == ip))
        elif prev is not None and prev.ip_address and not from_ipam(prev.info_source):
            entry.ip_address, entry.info_source = prev.ip_address, prev.info_source
        result.append(entry)
    return result, contradictions


CHANGE_HELD_MESSAGE = (
    "the spec's change is not admitted (see condition SpecAccepted): the VM runs as it was, and "
    "a restart would not apply it"
)


def _restart_required(held: bool, stale: bool) -> tuple[bool, str, str]:
    """Condition RestartRequired: (status, reason, message)."""
    if held:  # a restart would not apply it: the controller has not admitted it (SpecAccepted)
        return False, "ChangeHeld", CHANGE_HELD_MESSAGE
    if stale:
        return True, "SpecChanged", RESTART_REQUIRED_MESSAGE
    return False, "UpToDate", ""


NOTHING_BOOTABLE_MESSAGE = (
    "no kernel, no disk from an image and no disk with a bootOrder: the firmware will find "
    "nothing to boot ('No bootable device'); add one, or set bootOrder on a disk you installed"
)


def boot_source(vm: VirtualMachine) -> str | None:
    """What the VM can boot from, said for its Bootable condition; None: nothing. A blank disk
    counts once the spec gives it a bootOrder (an OS installed onto it earlier, say)."""
    spec = vm.spec
    if spec.kernel is not None:
        return f"kernel {spec.kernel.image}"
    ordered = sorted((d for d in spec.disks if d.boot_order is not None), key=lambda d: d.boot_order or 0)
    first = ordered[0] if ordered else next((d for d in spec.disks if d.image is not None), None)
    return f"disk {first.name}" if first is not None else None


def status_after(
    vm: VirtualMachine,
    old: VirtualMachineStatus,
    outcome: Outcome,
    node: str,
    at: datetime | None = None,
    deleting: bool = False,
    readiness: Readiness | None = None,
    snapshots: int = 0,
) -> VirtualMachineStatus:
    """The status fields after the reconciler left the domain as ``outcome.domain``; with a
    readiness probe, ``readiness`` says what it found in the domain's current run (a running
    VM is Starting until the probe first passes, and Ready only while it passes); ``snapshots``:
    how many VmSnapshots of the VM exist (LiveMigratable)."""
    stamp = at or now()
    domain = outcome.domain
    actual = domain.actual if domain else None
    phase = phase_of(desired_of(vm, deleting=deleting), actual, outcome.stopping)
    gen = vm.metadata.generation
    state = actual.state if actual else None
    conditions = old.conditions
    running = state is DomainState.RUNNING and phase == "Running"
    if running and vm.spec.readiness_probe is not None:
        verdict = readiness or Readiness(
            False, False, "ReadinessProbePending", "waiting for the readiness probe"
        )
        if not verdict.ever_ready:
            phase = "Starting"
        conditions = set_condition(
            conditions, "Ready", verdict.ready, verdict.reason, verdict.message, gen, stamp
        )
    else:
        conditions = set_condition(
            conditions,
            "Ready",
            running,
            "Running" if running else f"Domain{phase}",
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
        conditions, "RestartRequired", *_restart_required(outcome.held, stale), gen, stamp
    )
    if not deleting:
        conditions = set_condition(conditions, "ImageReady", True, "ImagesReady", "", gen, stamp)
        source = boot_source(vm)
        conditions = set_condition(
            conditions,
            "Bootable",
            source is not None,
            "HasBootSource" if source else "NothingBootable",
            source or NOTHING_BOOTABLE_MESSAGE,
            gen,
            stamp,
        )
    if not deleting:
        refusal = not_live_migratable(vm, paused or bool(vm.spec.paused), snapshots)
        conditions = set_condition(
            conditions,
            "LiveMigratable",
            refusal is None,
            refusal.reason if refusal else "Migratable",
            refusal.message if refusal else "",
            gen,
            stamp,
        )
    shown, contradictions = interfaces(vm, old, outcome.addresses)
    if vm.spec.networks and not deleting:
        conditions = set_condition(conditions, "NetworkReady", True, "NetworksReady", "", gen, stamp)
        conditions = set_condition(
            conditions,
            "AddressesMatch",
            not contradictions,
            "AddressMismatch" if contradictions else "AsAssigned",
            "; ".join(contradictions),
            gen,
            stamp,
        )
    fields = VirtualMachineStatus(
        phase=phase,
        node_name=node,
        observed_generation=gen,
        conditions=conditions,
        message=f"domain {domain.name} is {state.value}" if domain and state else "no domain",
        interfaces=shown,
    )
    if domain is not None:
        fields.domain_uuid = domain.uuid
    if state in (DomainState.RUNNING, DomainState.PAUSED) and not deleting:
        # Kept from the last answer while the agent is busy or the guest paused; the guest
        # agent is asked again after each start.
        info = outcome.guest_os or old.guest_os_info
        if info is not None:
            fields.guest_os_info = info
    elif old.guest_os_info is not None:
        fields.guest_os_info = None  # a stopped VM has no OS to tell of
    if Action.START in outcome.actions:
        fields.started_at = stamp
        if old.started_at is not None:
            fields.restart_count = old.restart_count + 1
    if outcome.restart_done and restart_requested(vm):
        fields.last_restart_requested_at = vm.spec.restart_requested_at
    return fields


def status_waiting(
    vm: VirtualMachine, old: VirtualMachineStatus, reason: str, message: str, condition: str = "ImageReady"
) -> VirtualMachineStatus:
    """The status of a VM whose images, secrets or networks are not ready: it waits in
    Provisioning, ``condition`` False with the reason."""
    gen = vm.metadata.generation
    conditions = set_condition(old.conditions, condition, False, reason, message, gen)
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


def bound_fields(
    fields: VirtualMachineStatus,
    old: VirtualMachineStatus,
    vm: VirtualMachine,
    node: str,
    at: datetime | None = None,
) -> VirtualMachineStatus:
    """``fields`` with the binding as the status shows it: the node, the vCPUs placement
    counted and Scheduled=True. The controller's binding is one metadata write; this rides along
    in every status write of the agent, and changes nothing once said."""
    gen = vm.metadata.generation
    base = fields.conditions or old.conditions
    fields.conditions = set_condition(
        base, "Scheduled", True, "Scheduled", f"bound to node {node}", gen, at or now()
    )
    fields.node_name = node
    fields.vcpus = vm.spec.vcpus
    return fields
