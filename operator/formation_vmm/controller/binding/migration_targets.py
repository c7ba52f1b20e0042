"""The binder's migration-target collaborator: where a VM may go when it leaves its node, live
(a node whose agent takes migrations) or started again from its images (a drain's Restart, a
lost node), placed as a new VM would be (its nodeSelector, its tolerations, room), and which
nodes are draining. Pure: it reads the binder's NodeRoom, under the binder's lock."""

from formation_vmm.api.names import DRAIN_TAINT, MIGRATION_ENDPOINT_ANNOTATION
from formation_vmm.controller.binding.node_room import NodeRoom
from formation_vmm.placement import Decision, Request


class MigrationTargets:
    def __init__(self, room: NodeRoom) -> None:
        self.room = room

    def takes_migrations(self, node: str, source: str) -> bool:
        """Whether ``node`` could ever be a target of a VM on ``source`` (room aside)."""
        summary = self.room.summary(node)
        return (
            node != source
            and summary is not None
            and MIGRATION_ENDPOINT_ANNOTATION in summary.get("annotations", {})
        )

    def live(self, request: Request, source: str, wanted: str | None) -> Decision:
        """Where a running VM may move: among the other nodes whose agents take migrations;
        only ``wanted`` when the user named a node."""
        takers = {name for name in self.room.names() if self.takes_migrations(name, source)}
        if wanted is not None and wanted not in takers:
            return Decision(None, _not_a_target(wanted, source, self.room.known(wanted)))
        if not takers:
            return Decision(None, f"no node other than {source} takes migrations")
        return self.room.place(request, lambda n: n.name in takers and wanted in (None, n.name))

    def restart(self, request: Request, source: str) -> Decision:
        """Where a VM started again from its images goes: any node but ``source``."""
        if not self.room.names() - {source}:
            return Decision(None, f"there is no node other than {source}")
        return self.room.place(request, lambda n: n.name != source)

    def draining(self) -> set[str]:
        """Nodes tainted for a drain (``kubectl vm drain``)."""
        return {
            name
            for name in self.room.names()
            if any(t.get("key") == DRAIN_TAINT for t in (self.room.summary(name) or {}).get("taints", []))
        }


def _not_a_target(wanted: str, source: str, known: bool) -> str:
    if wanted == source:
        return f"the VM runs on node {source} already"
    if not known:
        return f"node {wanted} is not a hypervisor node (labeled vmm.formation.cloud/hypervisor=true)"
    return f"node {wanted} takes no migrations: its agent publishes no migration endpoint"
