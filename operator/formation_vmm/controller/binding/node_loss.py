"""The binder's lost-node collaborator: which nodes are lost (their agent's heartbeat is older
than ``node_lost_seconds``: their VMs' state is unknown) and which are given up for lost (an
admin marked the node out of service and its agent is silent; or its Node object has been gone
that long while VMs are bound to it). Pure, with the clock passed in; the binder calls it under
its lock and writes what follows (controller/moves/lost_nodes.py restarts what may restart)."""

from collections.abc import Iterable

from formation_vmm.api.names import OUT_OF_SERVICE_TAINT
from formation_vmm.controller.binding.node_room import NodeRoom


class NodeLoss:
    def __init__(self, room: NodeRoom) -> None:
        self.room = room
        # Nodes VMs are bound to that have no Node object: since when this process knows so.
        self._missing_since: dict[str, float] = {}

    def node_event(self, event_type: str | None, name: str, now: float) -> None:
        if event_type == "DELETED":
            self._missing_since.setdefault(name, now)
        else:
            self._missing_since.pop(name, None)

    def lost(self) -> set[str]:
        """Known nodes whose agent is silent."""
        return {info.name for info in self.room.infos() if not info.ready}

    def given_up(self, needed: Iterable[str], now: float) -> dict[str, str]:
        """Nodes given up for lost, with why. ``needed``: nodes VMs are bound to or something
        else waits for; one of them without a Node for ``node_lost_seconds`` is given up (the
        caller confirms the Node is gone: a watch that has not delivered it yet looks the
        same)."""
        found = {
            info.name: "marked out of service, and its agent is silent"
            for info in self.room.infos()
            if not info.ready and any(t.get("key") == OUT_OF_SERVICE_TAINT for t in info.taints)
        }
        for node in set(needed) - self.room.names():
            since = self._missing_since.setdefault(node, now)
            if now - since >= self.room.node_lost_seconds:
                found[node] = "its Node was deleted"
        return found
