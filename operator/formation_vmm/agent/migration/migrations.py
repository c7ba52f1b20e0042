"""This node's part in live migrations (docs/migration.md): as the target, it prepares the VM's
files and a stopped definition of its domain; as the source, it has libvirt copy the running
guest there, follows the copy, cancels it when told or when it runs too long, and removes the VM's
files once the guest runs on the target. The controller schedules migrations and moves the
binding; the two agents each write their phase of the VmMigration's status.

Each migration is a key of the agent's work queue (its namespace/name): the informer's events
only queue it, and the queue's migration workers run one job per migration at a time (a copy
lasts seconds to minutes; the VMs' workers stay free). A mark on disk (migration_marks) holds
the VM against its node's sync and orphan sweep for as long as the migration may still need it.

This module decides which job a migration's state asks for; the target's half is
migration_target.py, the source's migration_source.py, and what both share migration_work.py."""

from formation_vmm.agent.migration.migration_source import OutgoingMigrations
from formation_vmm.agent.migration.migration_target import IncomingMigrations
from formation_vmm.agent.migration.migration_work import RETRY_SECONDS, Body, Endpoint, MigrationError, Tuning
from formation_vmm.agent.vms.migration_marks import Mark
from formation_vmm.api.models import VmMigration

__all__ = ["Endpoint", "MigrationError", "NodeMigrations", "Tuning"]


class NodeMigrations(IncomingMigrations, OutgoingMigrations):
    """A migration's key: which half's job it asks for now."""

    def process(self, key: str) -> float | None:
        """The work a VmMigration asks of this node, as the informer's store shows it (absent:
        deleted). Returns when to look again."""
        if not self.watched.synced.is_set():
            return RETRY_SECONDS  # absent from an empty store is not deleted
        body = self.watched.get(key)
        uid = (body or {}).get("metadata", {}).get("uid")
        namespace, _, name = key.partition("/")
        delays = [
            self._gone(mark)
            for mark in self.marks.all()
            # Marks of a migration of this name that is gone (deleted, here or while this agent
            # was away, or replaced by a new one of the same name).
            if (mark.namespace, mark.migration) == (namespace, name) and mark.migration_uid != uid
        ]
        if body is not None:
            delays.append(self._job(body))
        return min((delay for delay in delays if delay is not None), default=None)

    def _gone(self, mark: Mark) -> float | None:
        gone = {
            "metadata": {"namespace": mark.namespace, "name": mark.migration, "uid": mark.migration_uid},
            "spec": {"vmName": mark.vm_name},
        }
        if mark.role == "in":
            return self._abandon_incoming(gone, mark)
        self._settle_outgoing(gone, mark)
        return None

    def _job(self, body: Body) -> float | None:
        status = VmMigration.model_validate(body).status
        if status.target_node == self.node:
            if status.phase == "Preparing":
                return self._prepare(body)
            if status.phase in ("Failed", "Cancelled"):
                return self._abandon_incoming(body)
            if status.phase == "Succeeded":
                self._arrived(body)
        elif status.source_node == self.node:
            if status.phase == "Migrating" and not status.domain_moved:
                self._move(body)
            elif status.phase in ("Succeeded", "Failed", "Cancelled"):
                self._settle_outgoing(body)
        return None

    def marked(self) -> list[str]:
        """The keys of the migrations this node holds marks for: looked at once the agent
        starts, so one deleted while it was away is settled."""
        return sorted({f"{mark.namespace}/{mark.migration}" for mark in self.marks.all()})
