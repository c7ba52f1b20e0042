"""This node's part in live migrations (docs/migration.md): as the target, it prepares the VM's
files and a stopped definition of its domain; as the source, it has libvirt copy the running
guest there, follows the copy, cancels it when told or when it runs too long, and removes the VM's
files once the guest runs on the target. The controller schedules migrations and moves the
binding; the two agents each write their phase of the VmMigration's status.

Each migration's work runs in a thread of this component's own (a copy lasts seconds to
minutes; kopf's and the sync's threads stay free). A mark on disk (migration_marks) holds the VM
against its node's sync and orphan sweep for as long as the migration may still need it.

This module routes the watch's events; the target's half is migration_target.py, the source's
migration_source.py, and what both share migration_work.py."""

from formation_vmm.agent.migration.migration_source import OutgoingMigrations
from formation_vmm.agent.migration.migration_target import IncomingMigrations
from formation_vmm.agent.migration.migration_work import Body, Endpoint, MigrationError, Tuning
from formation_vmm.api.models import VmMigration

__all__ = ["Endpoint", "MigrationError", "NodeMigrations", "Tuning"]


class NodeMigrations(IncomingMigrations, OutgoingMigrations):
    """The watch's entry point: which half's job a migration's change asks for."""

    def event(self, event_type: str | None, body: Body) -> None:
        mig = VmMigration.model_validate(body)
        uid = mig.metadata.uid or ""
        status = mig.status
        if event_type == "DELETED":
            with self._lock:
                self._waiting.pop(uid, None)
                if uid in self._busy:
                    self._cancelled.add(uid)  # the copy's loop cancels it
            if status.target_node == self.node:
                self._submit(uid, self._abandon_incoming, body)
            elif status.source_node == self.node:
                self._submit(uid, self._settle_outgoing, body)
            return
        if status.target_node == self.node:
            if status.phase == "Preparing":
                self._submit(uid, self._prepare, body)
            elif status.phase in ("Failed", "Cancelled"):
                self._submit(uid, self._abandon_incoming, body)
            elif status.phase == "Succeeded":
                self._submit(uid, self._arrived, body)
        elif status.source_node == self.node:
            if status.phase == "Migrating" and not status.domain_moved:
                self._submit(uid, self._move, body)
            elif status.phase in ("Succeeded", "Failed", "Cancelled"):
                with self._lock:
                    if uid in self._busy and not status.domain_moved:
                        self._cancelled.add(uid)  # ended by the controller (a node lost): stop the copy
                self._submit(uid, self._settle_outgoing, body)

    def retry_waiting(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, {}
        for body in waiting.values():
            self.event(None, body)

    def sweep(self, existing: set[str]) -> None:
        """Marks whose migration is gone from the API (deleted while this agent was down):
        their VM is handed back to the sync, or their prepared files removed. ``existing``: the
        uids of every VmMigration, as listed now."""
        for mark in self.marks.all():
            if mark.migration_uid in existing:
                continue
            gone = {
                "metadata": {"namespace": mark.namespace, "name": mark.migration, "uid": mark.migration_uid},
                "spec": {"vmName": mark.vm_name},
            }
            if mark.role == "in":
                self._submit(mark.migration_uid, self._abandon_incoming, gone, mark)
            else:
                self._submit(mark.migration_uid, self._settle_outgoing, gone, mark)
