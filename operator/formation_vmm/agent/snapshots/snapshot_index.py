"""Which VM each VmSnapshot belongs to: an index of the snapshots' informer store. A VM with any
snapshot cannot move live (its LiveMigratable condition says so; the controller refuses the same
VMs by the same count, controller/migrations.snapshot_counts). One being deleted no longer
counts: its data goes with it."""

from collections.abc import Callable
from typing import Any

from formation_vmm.informer import Informer

BY_VM = "vm"


def vm_of(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(namespace, VM) of a snapshot that counts; none for one being deleted."""
    meta = body["metadata"]
    if meta.get("deletionTimestamp"):
        return []
    return [(str(meta.get("namespace", "")), str((body.get("spec") or {}).get("vmName", "")))]


def counter(snapshots: Informer) -> Callable[[str, str], int]:
    """How many snapshots count for VM (namespace, name), from the store."""
    return lambda namespace, vm: len(snapshots.by(BY_VM, (namespace, vm)))
