"""Internal qcow2 snapshots through libvirt and QEMU: of a running domain's disks (one QMP
transaction, for what libvirt's API has no call for), or of its disks and memory (libvirt)."""

import json
import logging
from typing import Any

import libvirt
import libvirt_qemu  # ships with libvirt-python

from formation_vmm.agent.hypervisor.connection import Hypervisor, HypervisorError, hypervisor_error
from formation_vmm.domain.snapshot_xml import memory_snapshot_xml
from formation_vmm.domain.xml import observe

log = logging.getLogger(__name__)


class DomainSnapshots:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hypervisor = hypervisor

    def _qmp(self, dom: libvirt.virDomain, command: dict[str, Any]) -> Any:
        try:
            return json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(command), 0))
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"QEMU refused {command['execute']}") from exc

    def _block_nodes(self, dom: libvirt.virDomain, paths: list[str]) -> list[str]:
        nodes = observe(dom.XMLDesc(0)).block_nodes
        missing = [p for p in paths if p not in nodes]
        if missing:
            raise HypervisorError(f"the running domain has no block node for {', '.join(missing)}")
        return [nodes[p] for p in paths]

    def freeze(self, name: str) -> bool:
        """Freeze the guest's filesystems through its guest agent (flushed, and no writes until
        ``thaw``); False when no agent answers, and nothing is frozen."""
        dom = self.hypervisor.require(name)
        try:
            dom.fsFreeze(None, 0)
        except libvirt.libvirtError as exc:
            log.info("%s: filesystems not frozen: %s", name, exc.get_error_message())
            return False
        return True

    def thaw(self, name: str) -> None:
        dom = self.hypervisor.require(name)
        try:
            dom.fsThaw(None, 0)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot thaw the filesystems of {name}") from exc

    def snapshot_disks_live(self, name: str, paths: list[str], snapshot: str) -> None:
        """One internal snapshot on each disk of a running QEMU domain, in one transaction (all
        disks at the same instant), without pausing the guest for longer than the commit."""
        dom = self.hypervisor.require(name)
        actions = [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": snapshot}}
            for node in self._block_nodes(dom, paths)
        ]
        self._qmp(dom, {"execute": "transaction", "arguments": {"actions": actions}})

    def delete_disk_snapshots_live(self, name: str, paths: list[str], snapshot: str) -> None:
        dom = self.hypervisor.require(name)
        for node in self._block_nodes(dom, paths):
            self._qmp(
                dom,
                {
                    "execute": "blockdev-snapshot-delete-internal-sync",
                    "arguments": {"device": node, "name": snapshot},
                },
            )

    def snapshot_with_memory(self, name: str, snapshot: str) -> None:
        """A libvirt internal snapshot of a running domain: disks and memory, so a revert resumes
        the guest where it was."""
        dom = self.hypervisor.require(name)
        try:
            xml = memory_snapshot_xml(snapshot, observe(dom.XMLDesc(0)).readonly_targets)
            dom.snapshotCreateXML(xml, 0)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot snapshot {name}") from exc

    def has_snapshot(self, name: str, snapshot: str) -> bool:
        dom = self.hypervisor.lookup(name)
        if dom is None:
            return False
        try:
            return snapshot in dom.snapshotListNames(0)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc) from exc

    def revert(self, name: str, snapshot: str) -> None:
        dom = self.hypervisor.require(name)
        try:
            dom.revertToSnapshot(dom.snapshotLookupByName(snapshot, 0), 0)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot revert {name} to {snapshot}") from exc

    def delete(self, name: str, snapshot: str) -> None:
        dom = self.hypervisor.lookup(name)
        if dom is None or not self.has_snapshot(name, snapshot):
            return
        try:
            dom.snapshotLookupByName(snapshot, 0).delete(0)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot delete snapshot {snapshot} of {name}") from exc
