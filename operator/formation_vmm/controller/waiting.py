"""Why a VmSnapshot or VmRestore waits with no agent to take it. Pure."""

from typing import Any

FINAL = {"InProgress", "Ready", "Succeeded", "Failed"}


def waiting_reason(vm: dict[str, Any] | None, vm_name: str) -> str | None:
    """Why no agent takes it, or None when the VM's agent will."""
    if vm is None:
        return f"VirtualMachine {vm_name} does not exist"
    status = vm.get("status") or {}
    if not status.get("nodeName"):
        return f"VirtualMachine {vm_name} is not on a node yet (phase {status.get('phase') or 'Pending'})"
    return None


def waiting_note(vm: dict[str, Any] | None, vm_name: str, status: dict[str, Any]) -> str | None:
    """The note to write, or None when there is nothing (new) to say: the VM's agent takes it,
    or the object already says exactly this."""
    reason = waiting_reason(vm, vm_name)
    if reason is None or (status.get("error") == reason and status.get("phase") == "Pending"):
        return None
    return reason
