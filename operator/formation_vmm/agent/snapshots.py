"""VmSnapshot and VmRestore on the VM's node. A snapshot is an internal qcow2 snapshot, named
after the VmSnapshot's uid, on each of the VM's writable disks: taken live through QEMU while the
VM runs (disks only, or with memory through libvirt when ``includeMemory``), with qemu-img while
it is stopped. Its data lives inside the VM's disks: deleting the VM deletes it too.

A snapshot or restore works under the VM's lock (the one every sync takes), so no sync starts,
stops or redefines the domain in the middle of one."""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client

from formation_vmm import metrics
from formation_vmm.agent import files
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.plan import DomainState
from formation_vmm.agent.sync import VmSync
from formation_vmm.agent.watch import VmCache
from formation_vmm.api.conditions import now
from formation_vmm.api.models import VirtualMachine, VmRestore, VmSnapshot
from formation_vmm.api.names import (
    API_VERSION,
    GROUP,
    NODE_LABEL,
    RESTORE_KIND,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VERSION,
    VM_KIND,
    agent_finalizer,
)
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from formation_vmm.images.formats import parse_qemu_info
from formation_vmm.kube import EventRecorder, StatusWriter

log = logging.getLogger(__name__)

Poke = Callable[[str], None]  # domain name: sync this VM soon


class SnapshotError(RuntimeError):
    """A snapshot or restore that cannot be done; the message goes to status.error."""


def snapshot_name(uid: str) -> str:
    return f"vmsnap-{uid}"


class Snapshots:
    def __init__(
        self,
        node: str,
        hypervisor: Hypervisor,
        layout: NodeLayout,
        sync: VmSync,
        cache: VmCache,
        snapshots: StatusWriter,
        restores: StatusWriter,
        events: EventRecorder,
    ) -> None:
        self.node = node
        self.hypervisor = hypervisor
        self.layout = layout
        self.sync = sync
        self.cache = cache
        self.snapshots = snapshots
        self.restores = restores
        self.events = events
        self.finalizer = agent_finalizer(node)
        self.poke: Poke | None = None
        # Snapshots and restores of VMs not (yet) in our cache: looked at again by retry_waiting,
        # so one created before its VM was bound here is still taken.
        self._waiting: dict[tuple[str, str, str], dict[str, Any]] = {}

    def forget(self, kind: str, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self._waiting.pop((kind, meta["namespace"], meta["name"]), None)

    def event(self, kind: str, event_type: str | None, body: dict[str, Any]) -> None:
        """A watch event of a VmSnapshot or VmRestore (``kind``)."""
        if event_type == "DELETED":
            self.forget(kind, body)
        elif kind == SNAPSHOT_KIND:
            self.snapshot_event(body)
        else:
            self.restore_event(body)

    def retry_waiting(self) -> None:
        for (kind, _ns, _name), body in list(self._waiting.items()):
            self.forget(kind, body)
            self.event(kind, None, body)

    # --- VmSnapshot ------------------------------------------------------------------------

    def snapshot_event(self, body: dict[str, Any]) -> None:
        snap = VmSnapshot.model_validate(body)
        meta = body["metadata"]
        namespace = meta["namespace"]
        mine = (meta.get("labels") or {}).get(NODE_LABEL) == self.node
        if meta.get("deletionTimestamp"):
            if mine and self.finalizer in (meta.get("finalizers") or []):
                self._delete_data(snap)
                self.snapshots.remove_finalizer(body, self.finalizer)
            return
        if snap.status.phase in ("Ready", "Failed"):
            return
        vm_body = self.cache.get(domain_name(namespace, snap.spec.vm_name))
        if vm_body is None:  # not a VM of this node (or not bound yet): its node's agent takes it
            self._waiting[(SNAPSHOT_KIND, namespace, meta["name"])] = body
            return
        if not mine:
            # Label (so deletion finds us even after the VM is gone), finalizer (the data is
            # removed before the object), owner (deleting the VM deletes its snapshots).
            self._claim(body, vm_body)
            return  # the claim's own watch event brings us back
        self._take(body, snap, VirtualMachine.model_validate(vm_body))

    def _claim(self, body: dict[str, Any], vm_body: dict[str, Any]) -> None:
        meta = body["metadata"]
        vm_meta = vm_body["metadata"]
        owner = {
            "apiVersion": API_VERSION,
            "kind": VM_KIND,
            "name": vm_meta["name"],
            "uid": vm_meta["uid"],
            "blockOwnerDeletion": False,
        }
        patch = {
            "metadata": {
                "resourceVersion": meta["resourceVersion"],
                "labels": {NODE_LABEL: self.node},
                "finalizers": [*(meta.get("finalizers") or []), self.finalizer],
                "ownerReferences": [*(meta.get("ownerReferences") or []), owner],
            }
        }
        try:
            self.snapshots.api.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], SNAPSHOT_PLURAL, meta["name"], patch
            )
        except client.ApiException as exc:
            if exc.status not in (404, 409):  # gone, or changed: the next event decides again
                raise

    def _disks(self, vm: VirtualMachine) -> list[Path]:
        namespace = vm.metadata.namespace or ""
        paths = (
            self.layout.disk_path(namespace, vm.metadata.name, d.name)
            for d in vm.spec.disks
            if not d.read_only
        )
        return [p for p in paths if p.exists()]

    def _take(self, body: dict[str, Any], snap: VmSnapshot, vm: VirtualMachine) -> None:
        # The event may predate our own last write (Ready): decide on the object as it is now.
        fresh = self.snapshots.get_or_none(body["metadata"]["namespace"], body["metadata"]["name"])
        if fresh is None or (fresh.get("status") or {}).get("phase") in ("Ready", "Failed"):
            return
        body = fresh
        uid = snap.metadata.uid or ""
        name = snapshot_name(uid)
        dom = domain_name(vm.metadata.namespace or "", vm.metadata.name)
        self.snapshots.write(body, lambda st: {"phase": "InProgress", "nodeName": self.node})
        try:
            with self.sync.locked(vm.metadata.uid or ""):
                disks = self._disks(vm)
                if not disks:
                    raise SnapshotError(f"VM {vm.metadata.name} has no disk to snapshot on {self.node}")
                info = self.hypervisor.describe(dom)
                running = info is not None and info.actual.state in (DomainState.RUNNING, DomainState.PAUSED)
                memory = False
                if running and snap.spec.include_memory:
                    if not self.hypervisor.has_snapshot(dom, name):
                        self.hypervisor.snapshot_with_memory(dom, name)
                    memory = True
                elif running and self.hypervisor.live_block_ops:
                    if not all(_has_internal(d, name) for d in disks):
                        self.hypervisor.snapshot_disks_live(dom, [str(d) for d in disks], name)
                else:
                    for disk in disks:
                        if not _has_internal(disk, name):
                            files.run_qemu_img("snapshot", "-c", name, str(disk))
                size = sum(_allocated(d) for d in disks)
        except (SnapshotError, HypervisorError, OSError) as exc:
            message = str(exc)
            metrics.SNAPSHOTS.labels("snapshot", "failed").inc()
            self.snapshots.write(body, lambda st: {"phase": "Failed", "readyToUse": False, "error": message})
            self.events.post(body, SNAPSHOT_KIND, "SnapshotFailed", message, "Warning")
            return
        fields = {
            "phase": "Ready",
            "readyToUse": True,
            "creationTime": now(),
            "size": size,
            "memory": memory,
            "disks": [d.stem for d in disks],
            "nodeName": self.node,
            "error": None,
        }
        self.snapshots.write(body, lambda st: fields)
        metrics.SNAPSHOTS.labels("snapshot", "ready").inc()
        kind = "disks and memory" if memory else "disks"
        self.events.post(
            body, SNAPSHOT_KIND, "SnapshotReady", f"{kind} of VM {vm.metadata.name} saved on {self.node}"
        )

    def _delete_data(self, snap: VmSnapshot) -> None:
        """Remove the snapshot from the VM's disks (if the VM and its disks are still here)."""
        namespace = snap.metadata.namespace or ""
        name = snapshot_name(snap.metadata.uid or "")
        vm_dir = self.layout.disk_dir(namespace, snap.spec.vm_name)
        disks = [vm_dir / f"{d}.qcow2" for d in snap.status.disks if (vm_dir / f"{d}.qcow2").exists()]
        if not disks:
            return  # deleted with the VM's disks
        dom = domain_name(namespace, snap.spec.vm_name)
        vm_body = self.cache.get(dom)
        with self.sync.locked((vm_body or {}).get("metadata", {}).get("uid", "")):
            info = self.hypervisor.describe(dom)
            running = info is not None and info.actual.active
            if snap.status.memory:
                self.hypervisor.delete_snapshot(dom, name)
            elif running and self.hypervisor.live_block_ops:
                with_it = [d for d in disks if _has_internal(d, name)]
                if with_it:
                    self.hypervisor.delete_disk_snapshots_live(dom, [str(d) for d in with_it], name)
            else:
                for disk in disks:
                    if _has_internal(disk, name):
                        files.run_qemu_img("snapshot", "-d", name, str(disk))
        log.info("removed snapshot %s/%s from %d disk(s)", namespace, snap.metadata.name, len(disks))

    # --- VmRestore -------------------------------------------------------------------------

    def restore_event(self, body: dict[str, Any]) -> None:
        restore = VmRestore.model_validate(body)
        meta = body["metadata"]
        if meta.get("deletionTimestamp") or restore.status.phase in ("Succeeded", "Failed"):
            return
        namespace = meta["namespace"]
        dom = domain_name(namespace, restore.spec.vm_name)
        vm_body = self.cache.get(dom)
        if vm_body is None:  # not a VM of this node (or not yet)
            self._waiting[(RESTORE_KIND, namespace, meta["name"])] = body
            return
        vm = VirtualMachine.model_validate(vm_body)
        # The event may predate our own last write: a restore is carried out once, never again.
        fresh = self.restores.get_or_none(namespace, meta["name"])
        if fresh is None or (fresh.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        body = fresh
        try:
            snap = self._ready_snapshot(namespace, restore, vm)
            self.restores.write(body, lambda st: {"phase": "InProgress"})
            self._revert(vm, dom, snap)
        except (SnapshotError, HypervisorError, OSError) as exc:
            message = str(exc)
            metrics.SNAPSHOTS.labels("restore", "failed").inc()
            self.restores.write(body, lambda st: {"phase": "Failed", "error": message, "completedAt": now()})
            self.events.post(body, RESTORE_KIND, "RestoreFailed", message, "Warning")
            return
        self.restores.write(body, lambda st: {"phase": "Succeeded", "completedAt": now(), "error": None})
        metrics.SNAPSHOTS.labels("restore", "succeeded").inc()
        message = f"disks of VM {vm.metadata.name} restored from snapshot {restore.spec.snapshot_name}"
        self.events.post(body, RESTORE_KIND, "Restored", message)
        self.events.post(vm_body, VM_KIND, "Restored", message)
        if self.poke is not None:
            self.poke(dom)  # started again (or not) per runStrategy by the usual sync

    def _ready_snapshot(self, namespace: str, restore: VmRestore, vm: VirtualMachine) -> VmSnapshot:
        found = self.snapshots.get_or_none(namespace, restore.spec.snapshot_name)
        if found is None:
            raise SnapshotError(f"VmSnapshot {restore.spec.snapshot_name} does not exist")
        snap = VmSnapshot.model_validate(found)
        if snap.spec.vm_name != vm.metadata.name:
            raise SnapshotError(
                f"VmSnapshot {snap.metadata.name} is of VM {snap.spec.vm_name}, not {vm.metadata.name}"
            )
        if not snap.status.ready_to_use:
            raise SnapshotError(
                f"VmSnapshot {snap.metadata.name} is not ready ({snap.status.phase or 'Pending'})"
            )
        if snap.status.node_name != self.node:
            raise SnapshotError(
                f"VmSnapshot {snap.metadata.name} is on node {snap.status.node_name}, not here"
            )
        return snap

    def _revert(self, vm: VirtualMachine, dom: str, snap: VmSnapshot) -> None:
        name = snapshot_name(snap.metadata.uid or "")
        vm_dir = self.layout.disk_dir(vm.metadata.namespace or "", vm.metadata.name)
        disks = [vm_dir / f"{d}.qcow2" for d in snap.status.disks]
        missing = [d.name for d in disks if not d.exists() or not _has_internal(d, name)]
        if missing and not snap.status.memory:
            raise SnapshotError(f"the snapshot's data is gone from disk(s) {', '.join(missing)}")
        with self.sync.locked(vm.metadata.uid or ""):
            self.hypervisor.destroy(dom)  # stopped hard: its disks are about to be replaced
            if snap.status.memory:
                self.hypervisor.revert_snapshot(dom, name)  # disks and memory: it resumes
            else:
                for disk in disks:
                    files.run_qemu_img("snapshot", "-a", name, str(disk))
        log.info("restored %s/%s from %s", vm.metadata.namespace, vm.metadata.name, snap.metadata.name)


def _internal_snapshots(disk: Path) -> list[str]:
    out = files.run_qemu_img("snapshot", "-l", "-U", str(disk))
    # Lines after the two header lines: "ID  TAG  VM SIZE  DATE  VM CLOCK  ICOUNT"
    return [line.split()[1] for line in out.splitlines()[2:] if len(line.split()) > 1]


def _has_internal(disk: Path, name: str) -> bool:
    return name in _internal_snapshots(disk)


def _allocated(disk: Path) -> int:
    return parse_qemu_info(files.run_qemu_img("info", "-U", "--output=json", str(disk))).actual_size
