"""Says why a VmSnapshot or VmRestore waits when no agent can take it: its VM does not exist, or
is not on a node yet. (The agent of the VM's node takes it from there and clears the note.)"""

from typing import Any

from formation_vmm.kube import StatusWriter

FINAL = {"InProgress", "Ready", "Succeeded", "Failed"}


def waiting_reason(vm: dict[str, Any] | None, vm_name: str) -> str | None:
    """Why no agent takes it, or None when the VM's agent will. Pure."""
    if vm is None:
        return f"VirtualMachine {vm_name} does not exist"
    status = vm.get("status") or {}
    if not status.get("nodeName"):
        return f"VirtualMachine {vm_name} is not on a node yet (phase {status.get('phase') or 'Pending'})"
    return None


class SnapshotNotes:
    def __init__(self, vms: StatusWriter, writers: dict[str, StatusWriter]) -> None:
        self.vms = vms
        self.writers = writers  # by kind: VmSnapshot, VmRestore

    def event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        status = body.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in FINAL:
            return
        vm_name = (body.get("spec") or {}).get("vmName", "")
        reason = waiting_reason(self.vms.get_or_none(meta["namespace"], vm_name), vm_name)
        if reason is None or (status.get("error") == reason and status.get("phase") == "Pending"):
            return
        self.writers[kind].write(
            body,
            lambda st: {} if st.get("phase") in FINAL else {"phase": "Pending", "error": reason},
        )
