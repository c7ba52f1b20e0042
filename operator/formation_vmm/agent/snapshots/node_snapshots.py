"""VmSnapshot and VmRestore on the VM's node. A snapshot is an internal qcow2 snapshot, named
after the VmSnapshot's uid, on each of the VM's writable disks: taken live through QEMU while the
VM runs (disks only, or with memory through libvirt when ``includeMemory``), with qemu-img while
it is stopped (``snapshot_mode``). Its data lives inside the VM's disks: deleting the VM deletes
it too.

A snapshot or restore works under the VM's domain lock (the one every sync takes), so no sync
starts, stops or redefines the domain in the middle of one. A restore leaves a marker beside the
VM's disks (``restore.json``) from before it stops the VM until its result is written: while it is
there the VM is held (no sync starts it), and an agent that crashed mid-restore finishes the same
restore when it comes back instead of reverting again a VM that ran meanwhile.

Each VmSnapshot and VmRestore is a key of the agent's work queue (its namespace/name), worked
on as its informer's store shows it. One of a VM not (yet) bound here waits for nothing: the
VM's arrival queues its snapshots and restores again (``vm_arrived``)."""

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.hypervisor.snapshots import DomainSnapshots
from formation_vmm.agent.snapshots.snapshot_index import BY_VM
from formation_vmm.agent.snapshots.snapshot_mode import SnapshotMode, removal_mode, snapshot_mode
from formation_vmm.agent.state import owner_of
from formation_vmm.agent.vms.files import restore_marker
from formation_vmm.agent.vms.sync import VmSync
from formation_vmm.agent.vms.vm_controller import VmCache
from formation_vmm.api.conditions import now
from formation_vmm.api.models import (
    VirtualMachine,
    VmRestore,
    VmRestoreStatus,
    VmSnapshot,
    VmSnapshotStatus,
)
from formation_vmm.api.names import (
    API_VERSION,
    NODE_LABEL,
    RESTORE_KIND,
    SNAPSHOT_KIND,
    VM_KIND,
    agent_finalizer,
)
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import UnsafeNameError, domain_name
from formation_vmm.domain.spec import Owner
from formation_vmm.host import atomic, qemu_img
from formation_vmm.informer import Informer, key_of
from formation_vmm.kube import EventRecorder, StatusWriter
from formation_vmm.workqueue import Lane

log = logging.getLogger(__name__)

Body = dict[str, Any]
Poke = Callable[[str], None]  # domain name: sync this VM soon


class SnapshotError(RuntimeError):
    """A snapshot or restore that cannot be done; the message goes to status.error."""


def snapshot_name(uid: str) -> str:
    return f"vmsnap-{uid}"


def recorded_disks(layout: NodeLayout, owner: Owner, snap: VmSnapshot) -> list[Path]:
    """The disk files ``status.disks`` names, each name checked as a disk's (a status is data
    from the API: never joined to a path as it is)."""
    try:
        return [layout.disk_path(owner, disk) for disk in snap.status.disks]
    except UnsafeNameError as exc:
        raise SnapshotError(f"VmSnapshot {snap.metadata.name} records an unusable disk: {exc}") from None


class Snapshots:
    def __init__(
        self,
        node: str,
        hypervisor: Hypervisor,
        layout: NodeLayout,
        sync: VmSync,
        cache: VmCache,
        snapshots: StatusWriter[VmSnapshotStatus],
        restores: StatusWriter[VmRestoreStatus],
        events: EventRecorder,
        poke: Poke,
        seen: Mapping[str, Informer],
        lanes: Mapping[str, Lane],
    ) -> None:
        """``seen``: the VmSnapshots' and VmRestores' informers by kind (their stores are what
        the work reads; both indexed by VM), ``lanes``: their keys' lanes in the work queue."""
        self.node = node
        self.hypervisor = hypervisor
        self.libvirt = DomainSnapshots(hypervisor)
        self.layout = layout
        self.sync = sync
        self.cache = cache
        self.snapshots = snapshots
        self.restores = restores
        self.events = events
        self.poke = poke
        self.seen = seen
        self.lanes = lanes
        self.finalizer = agent_finalizer(node)

    def vm_arrived(self, namespace: str, vm: str) -> None:
        """A VM new to this node's cache: its snapshots and restores that waited for it."""
        for kind, informer in self.seen.items():
            for body in informer.by(BY_VM, (namespace, vm)):
                self.lanes[kind].add(key_of(body))

    def process_snapshot(self, key: str) -> None:
        body = self.seen[SNAPSHOT_KIND].get(key)
        if body is not None:  # gone: its data went before it (the finalizer)
            self.snapshot(body)

    def process_restore(self, key: str) -> None:
        body = self.seen[RESTORE_KIND].get(key)
        if body is not None:
            self.restore(body)

    # --- VmSnapshot ------------------------------------------------------------------------

    def snapshot(self, body: Body) -> None:
        snap = VmSnapshot.model_validate(body)
        meta = body["metadata"]
        namespace = meta["namespace"]
        mine = (meta.get("labels") or {}).get(NODE_LABEL) == self.node
        if meta.get("deletionTimestamp"):
            if mine and self.finalizer in (meta.get("finalizers") or []):
                try:
                    self._delete_data(snap, _vm_uid(body))
                except SnapshotError as exc:
                    # Nothing it names can be found safely: what it left goes with the disks.
                    log.warning("%s/%s: %s", namespace, meta["name"], exc)
                self.snapshots.remove_finalizer(body, self.finalizer)
            return
        if snap.status.phase in ("Ready", "Failed"):
            return
        vm_body = self.cache.get(domain_name(namespace, snap.spec.vm_name))
        if vm_body is None:  # not a VM of this node (or not yet: vm_arrived queues it again)
            return
        if not mine:
            # Label (so deletion finds us even after the VM is gone), finalizer (the data is
            # removed before the object), owner (deleting the VM deletes its snapshots).
            self._claim(body, vm_body)
            return  # the claim's own watch event brings us back
        self._take(body, snap, VirtualMachine.model_validate(vm_body))

    def _claim(self, body: Body, vm_body: Body) -> None:
        meta = body["metadata"]
        vm_meta = vm_body["metadata"]
        owner = {
            "apiVersion": API_VERSION,
            "kind": VM_KIND,
            "name": vm_meta["name"],
            "uid": vm_meta["uid"],
            "blockOwnerDeletion": False,
        }
        # At the version read: if it changed meanwhile, the next event decides again.
        self.snapshots.patch_at_version(
            body,
            {
                "labels": {NODE_LABEL: self.node},
                "finalizers": [*(meta.get("finalizers") or []), self.finalizer],
                "ownerReferences": [*(meta.get("ownerReferences") or []), owner],
            },
        )

    def _disks(self, vm: VirtualMachine) -> list[Path]:
        owner = owner_of(vm)
        paths = (self.layout.disk_path(owner, d.name) for d in vm.spec.disks if not d.read_only)
        return [p for p in paths if p.exists()]

    def _take(self, body: Body, snap: VmSnapshot, vm: VirtualMachine) -> None:
        # The event may predate our own last write (Ready): decide on the object as it is now.
        fresh = self.snapshots.get_or_none(body["metadata"]["namespace"], body["metadata"]["name"])
        if fresh is None or (fresh.get("status") or {}).get("phase") in ("Ready", "Failed"):
            return
        body = fresh
        name = snapshot_name(snap.metadata.uid or "")
        dom = domain_name(vm.metadata.namespace or "", vm.metadata.name)
        self.snapshots.write(body, lambda _: VmSnapshotStatus(phase="InProgress", node_name=self.node))
        try:
            with self.sync.locked(dom):
                disks = self._disks(vm)
                if not disks:
                    raise SnapshotError(f"VM {vm.metadata.name} has no disk to snapshot on {self.node}")
                info = self.hypervisor.describe(dom)
                running = info is not None and info.actual.active
                mode = snapshot_mode(running, snap.spec.include_memory, self.hypervisor.runs_qemu)
                indications: list[Literal["Online", "GuestAgent", "NoGuestAgent"]] | None = (
                    ["Online"] if running else None
                )
                if mode is SnapshotMode.MEMORY:
                    if not self.libvirt.has_snapshot(dom, name):
                        self.libvirt.snapshot_with_memory(dom, name)
                elif mode is SnapshotMode.LIVE_DISKS:
                    if not all(_has_internal(d, name) for d in disks):
                        # Frozen for the instant of the snapshot, and thawed whatever happens:
                        # a guest left frozen hangs on its next write.
                        frozen = self.libvirt.freeze(dom)
                        try:
                            self.libvirt.snapshot_disks_live(dom, [str(d) for d in disks], name)
                        finally:
                            if frozen:
                                self.libvirt.thaw(dom)
                        indications = ["Online", "GuestAgent" if frozen else "NoGuestAgent"]
                else:
                    for disk in disks:
                        if not _has_internal(disk, name):
                            qemu_img.run("snapshot", "-c", name, str(disk))
                self._keep_nvram(owner_of(vm), name)
                size = sum(qemu_img.info(d, "qcow2").actual_size for d in disks)
        except (SnapshotError, HypervisorError, OSError) as exc:
            message = str(exc)
            metrics.SNAPSHOTS.labels("snapshot", "failed").inc()
            self.snapshots.write(
                body, lambda _: VmSnapshotStatus(phase="Failed", ready_to_use=False, error=message)
            )
            self.events.post(body, SNAPSHOT_KIND, "SnapshotFailed", message, "Warning")
            return
        fields = VmSnapshotStatus(
            phase="Ready",
            ready_to_use=True,
            creation_time=now(),
            size=size,
            memory=mode is SnapshotMode.MEMORY,
            disks=[d.stem for d in disks],
            indications=indications,
            node_name=self.node,
            error=None,
        )
        self.snapshots.write(body, lambda _: fields)
        metrics.SNAPSHOTS.labels("snapshot", "ready").inc()
        kind = "disks and memory" if fields.memory else "disks"
        self.events.post(
            body, SNAPSHOT_KIND, "SnapshotReady", f"{kind} of VM {vm.metadata.name} saved on {self.node}"
        )

    def _keep_nvram(self, owner: Owner, snapshot: str) -> None:
        """A UEFI VM's variables go with its snapshot (boot entries, Secure Boot keys): copied
        whole beside the disks. OVMF writes them only when the guest changes a variable, so a
        copy taken while it runs is the state of its last write."""
        nvram = self.layout.nvram_path(owner)
        if nvram.is_file():
            atomic.write_bytes(self.layout.nvram_snapshot_path(owner, snapshot), nvram.read_bytes())

    def _delete_data(self, snap: VmSnapshot, vm_uid: str | None) -> None:
        """Remove the snapshot from the VM's disks (if the VM and its disks are still here)."""
        if vm_uid is None:
            return
        namespace = snap.metadata.namespace or ""
        owner = Owner(namespace=namespace, name=snap.spec.vm_name, uid=vm_uid)
        name = snapshot_name(snap.metadata.uid or "")
        self.layout.nvram_snapshot_path(owner, name).unlink(missing_ok=True)
        disks = [d for d in recorded_disks(self.layout, owner, snap) if d.exists()]
        if not disks:
            return  # deleted with the VM's disks
        dom = domain_name(namespace, snap.spec.vm_name)
        with self.sync.locked(dom):
            info = self.hypervisor.describe(dom)
            holder = info.owner if info is not None else None
            active = info is not None and info.actual.active and holder is not None and holder.uid == vm_uid
            mode = removal_mode(bool(snap.status.memory), active, self.hypervisor.runs_qemu)
            if mode is SnapshotMode.MEMORY:
                self.libvirt.delete(dom, name)
            elif mode is SnapshotMode.LIVE_DISKS:
                with_it = [d for d in disks if _has_internal(d, name)]
                if with_it:
                    self.libvirt.delete_disk_snapshots_live(dom, [str(d) for d in with_it], name)
            else:
                for disk in disks:
                    if _has_internal(disk, name):
                        qemu_img.run("snapshot", "-d", name, str(disk))
        log.info("removed snapshot %s/%s from %d disk(s)", namespace, snap.metadata.name, len(disks))

    # --- VmRestore -------------------------------------------------------------------------

    def restore(self, body: Body) -> None:
        restore = VmRestore.model_validate(body)
        meta = body["metadata"]
        if meta.get("deletionTimestamp") or restore.status.phase in ("Succeeded", "Failed"):
            return
        namespace = meta["namespace"]
        dom = domain_name(namespace, restore.spec.vm_name)
        vm_body = self.cache.get(dom)
        if vm_body is None:  # not a VM of this node (or not yet: vm_arrived queues it again)
            return
        vm = VirtualMachine.model_validate(vm_body)
        if (meta.get("labels") or {}).get(NODE_LABEL) != self.node:
            # Claim it for this node first (at the version read): only then may this agent write
            # its status (the admission policy binding agents to their nodes says so).
            self.restores.patch_at_version(body, {"labels": {NODE_LABEL: self.node}})
            return  # the claim's own watch event brings us back
        # The event may predate our own last write: a restore is carried out once, never again.
        fresh = self.restores.get_or_none(namespace, meta["name"])
        if fresh is None or (fresh.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        body = fresh
        marker = restore_marker(self.layout, owner_of(vm))
        try:
            snap = self._ready_snapshot(namespace, restore, vm)
            self.restores.write(body, lambda _: VmRestoreStatus(phase="InProgress"))
            self._revert(vm, dom, snap, marker, restore.metadata.uid or "")
        except (SnapshotError, HypervisorError, OSError) as exc:
            message = str(exc)
            metrics.SNAPSHOTS.labels("restore", "failed").inc()
            self.restores.write(
                body, lambda _: VmRestoreStatus(phase="Failed", error=message, completed_at=now())
            )
            self.events.post(body, RESTORE_KIND, "RestoreFailed", message, "Warning")
            self._release(marker, restore.metadata.uid or "", dom)
            return
        self.restores.write(
            body, lambda _: VmRestoreStatus(phase="Succeeded", completed_at=now(), error=None)
        )
        metrics.SNAPSHOTS.labels("restore", "succeeded").inc()
        message = f"disks of VM {vm.metadata.name} restored from snapshot {restore.spec.snapshot_name}"
        self.events.post(body, RESTORE_KIND, "Restored", message)
        self.events.post(vm_body, VM_KIND, "Restored", message)
        self._release(marker, restore.metadata.uid or "", dom)

    def _release(self, marker: Path, restore_uid: str, dom: str) -> None:
        """The restore's result is written: the VM is no longer held, and is started again (or
        not) per runStrategy by the usual sync."""
        if _marker_of(marker).get("restore") == restore_uid:
            marker.unlink(missing_ok=True)
        self.poke(dom)

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
        if _vm_uid(found) not in (None, vm.metadata.uid):
            raise SnapshotError(
                f"VmSnapshot {snap.metadata.name} was taken of an earlier VM named {vm.metadata.name}"
            )
        return snap

    def _revert(self, vm: VirtualMachine, dom: str, snap: VmSnapshot, marker: Path, restore_uid: str) -> None:
        name = snapshot_name(snap.metadata.uid or "")
        disks = recorded_disks(self.layout, owner_of(vm), snap)
        with self.sync.locked(dom):
            state = _marker_of(marker)
            if state.get("restore") == restore_uid and state.get("stage") == "reverted":
                return  # done before a crash; only the result was not written
            missing = [d.name for d in disks if not d.exists() or not _has_internal(d, name)]
            if missing and not snap.status.memory:
                raise SnapshotError(f"the snapshot's data is gone from disk(s) {', '.join(missing)}")
            _write_marker(marker, restore_uid, "reverting")  # from here on the VM is held
            self.hypervisor.destroy(dom)  # stopped hard: its disks are about to be replaced
            kept = self.layout.nvram_snapshot_path(owner_of(vm), name)
            if kept.is_file():  # before a memory revert starts QEMU on it again
                atomic.write_bytes(self.layout.nvram_path(owner_of(vm)), kept.read_bytes())
            if snap.status.memory:
                self.libvirt.revert(dom, name)  # disks and memory: it resumes
            else:
                for disk in disks:
                    qemu_img.run("snapshot", "-a", name, str(disk))
            _write_marker(marker, restore_uid, "reverted")
        log.info("restored %s/%s from %s", vm.metadata.namespace, vm.metadata.name, snap.metadata.name)


def _vm_uid(body: Body) -> str | None:
    """The VM a claimed snapshot belongs to, from its owner reference."""
    for ref in body["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == VM_KIND:
            return str(ref.get("uid"))
    return None


def _marker_of(marker: Path) -> dict[str, Any]:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_marker(marker: Path, restore_uid: str, stage: str) -> None:
    atomic.write_bytes(marker, json.dumps({"restore": restore_uid, "stage": stage}).encode())


def _internal_snapshots(disk: Path) -> list[str]:
    out = qemu_img.run("snapshot", "-l", "-U", str(disk))
    # Lines after the two header lines: "ID  TAG  VM SIZE  DATE  VM CLOCK  ICOUNT"
    return [line.split()[1] for line in out.splitlines()[2:] if len(line.split()) > 1]


def _has_internal(disk: Path, name: str) -> bool:
    return name in _internal_snapshots(disk)
