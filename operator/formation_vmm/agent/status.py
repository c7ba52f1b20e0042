"""The status the agent writes after reconciling a VM. Pure."""

from typing import Any

from formation_vmm.agent.hypervisor import DomainInfo
from formation_vmm.agent.plan import Action, DomainState, phase_of
from formation_vmm.agent.reconcile import desired_of
from formation_vmm.api.conditions import now, set_condition
from formation_vmm.api.models import VirtualMachine


def status_after(
    vm: VirtualMachine,
    old_status: dict[str, Any],
    actions: list[Action],
    domain: DomainInfo | None,
    node: str,
    at: str | None = None,
) -> dict[str, Any]:
    """The status fields to patch after ``actions`` left the domain as ``domain``."""
    stamp = at or now()
    desired = desired_of(vm, deleting=False)
    phase = phase_of(desired, domain.actual if domain else None)
    conditions = old_status.get("conditions") or []
    gen = vm.metadata.generation
    state = domain.actual.state if domain else None
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
    patch: dict[str, Any] = {
        "phase": phase,
        "nodeName": node,
        "observedGeneration": gen,
        "conditions": conditions,
        "message": f"domain {domain.name} is {state.value}" if domain and state else "no domain",
    }
    if domain is not None:
        patch["domainUUID"] = domain.uuid
    if Action.START in actions:
        patch["startedAt"] = stamp
        if old_status.get("startedAt"):
            patch["restartCount"] = int(old_status.get("restartCount") or 0) + 1
    return patch
