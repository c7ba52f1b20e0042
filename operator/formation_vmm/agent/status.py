"""The status the agent writes after reconciling a VM. Pure."""

from typing import Any

from formation_vmm.agent.plan import Action, DomainState, phase_of
from formation_vmm.agent.reconcile import Outcome, desired_of, restart_requested
from formation_vmm.api.conditions import now, set_condition
from formation_vmm.api.models import VirtualMachine
from formation_vmm.domain.naming import stable_mac

RESTART_REQUIRED_MESSAGE = (
    "the spec changed in a way that needs a restart (CPU, memory, disks, kernel or networks); "
    "restart the VM to apply it (kubectl vm restart)"
)


def interfaces(vm: VirtualMachine, addresses: dict[str, str]) -> list[dict[str, Any]]:
    result = []
    for net in vm.spec.networks:
        mac = (net.mac_address or stable_mac(vm.metadata.uid or "", net.name)).lower()
        entry: dict[str, Any] = {"name": net.name, "mac": mac}
        if mac in addresses:
            entry["ipAddress"] = addresses[mac]
        result.append(entry)
    return result


def status_after(
    vm: VirtualMachine, old_status: dict[str, Any], outcome: Outcome, node: str, at: str | None = None
) -> dict[str, Any]:
    """The status fields after the reconciler left the domain as ``outcome.domain``."""
    stamp = at or now()
    domain = outcome.domain
    actual = domain.actual if domain else None
    phase = phase_of(desired_of(vm, deleting=False), actual)
    gen = vm.metadata.generation
    state = actual.state if actual else None
    conditions = old_status.get("conditions") or []
    ready = state is DomainState.RUNNING
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
    stale = actual is not None and actual.active and actual.spec_hash != outcome.spec_hash
    conditions = set_condition(
        conditions,
        "RestartRequired",
        stale,
        "SpecChanged" if stale else "UpToDate",
        RESTART_REQUIRED_MESSAGE if stale else "",
        gen,
        stamp,
    )
    conditions = set_condition(conditions, "ImageReady", True, "ImagesReady", "", gen, stamp)
    fields: dict[str, Any] = {
        "phase": phase,
        "nodeName": node,
        "observedGeneration": gen,
        "conditions": conditions,
        "message": f"domain {domain.name} is {state.value}" if domain and state else "no domain",
        "interfaces": interfaces(vm, outcome.addresses),
    }
    if domain is not None:
        fields["domainUUID"] = domain.uuid
    if Action.START in outcome.actions:
        fields["startedAt"] = stamp
        if old_status.get("startedAt"):
            fields["restartCount"] = int(old_status.get("restartCount") or 0) + 1
    if restart_requested(vm):
        fields["lastRestartRequestedAt"] = (
            vm.spec.restart_requested_at.isoformat() if vm.spec.restart_requested_at else None
        )
    return fields


def status_waiting(
    vm: VirtualMachine, old_status: dict[str, Any], reason: str, message: str
) -> dict[str, Any]:
    """The status of a VM whose images or secrets are not ready: it waits in Provisioning."""
    gen = vm.metadata.generation
    conditions = set_condition(old_status.get("conditions"), "ImageReady", False, reason, message, gen)
    conditions = set_condition(conditions, "Ready", False, reason, message, gen)
    return {"phase": "Provisioning", "message": message, "observedGeneration": gen, "conditions": conditions}


def status_failed(
    vm: VirtualMachine, old_status: dict[str, Any], reason: str, message: str
) -> dict[str, Any]:
    gen = vm.metadata.generation
    conditions = set_condition(old_status.get("conditions"), "Ready", False, reason, message, gen)
    return {"phase": "Failed", "message": message, "observedGeneration": gen, "conditions": conditions}


def changes(old_status: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    """The fields whose value differs from the status as read: an empty result means no write."""
    return {key: value for key, value in fields.items() if old_status.get(key) != value}
