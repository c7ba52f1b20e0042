"""Says why a VmSnapshot or VmRestore waits when no agent can take it: its VM does not exist, or
is not on a node yet. (The agent of the VM's node takes it from there and clears the note.)
The decision is ``waiting_note`` (pure); ``SnapshotNotes`` reads and writes."""

from typing import Any

from formation_vmm.api.models import VmRestoreStatus, VmSnapshotStatus
from formation_vmm.api.names import RESTORE_KIND, VM_PLURAL
from formation_vmm.controller.waiting import FINAL, waiting_note
from formation_vmm.kube import Kube, StatusWriter


class SnapshotNotes:
    def __init__(
        self,
        kube: Kube,
        snapshots: StatusWriter[VmSnapshotStatus],
        restores: StatusWriter[VmRestoreStatus],
    ) -> None:
        self.kube = kube
        self.snapshots = snapshots
        self.restores = restores

    def event(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        vm_name = str((body.get("spec") or {}).get("vmName", ""))
        status = body.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in FINAL:
            return
        vm = self.kube.get_or_none(VM_PLURAL, meta["namespace"], vm_name)
        note = waiting_note(vm, vm_name, status)
        if note is None:
            return
        if kind == RESTORE_KIND:
            self.restores.write(
                body,
                lambda st: (
                    VmRestoreStatus() if st.phase in FINAL else VmRestoreStatus(phase="Pending", error=note)
                ),
            )
        else:
            self.snapshots.write(
                body,
                lambda st: (
                    VmSnapshotStatus() if st.phase in FINAL else VmSnapshotStatus(phase="Pending", error=note)
                ),
            )
