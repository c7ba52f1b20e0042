"""The binder's placement collaborator: the hypervisor nodes as their Node objects say (read
by nodes.py), the load bound on each (running sums, as the binder binds and releases), the room
held on a node for a VM on its way there (a migration from Preparing until its binding moves),
and placement over them (placement.py). Pure and not locked: the binder calls it under its own
lock, so a decision and the room it takes are one step."""

from collections.abc import Callable
from typing import Any

from formation_vmm.controller.binding.nodes import Ceiling, node_info
from formation_vmm.placement import Decision, Load, NodeInfo, Request, place

Summary = dict[str, Any]


class NodeRoom:
    def __init__(
        self,
        node_lost_seconds: float,
        cpu_overcommit: float = 1.0,
        memory_overcommit: float = 1.0,
        ceiling: Ceiling | None = None,
    ) -> None:
        self.node_lost_seconds = node_lost_seconds
        self.cpu_overcommit = cpu_overcommit
        self.memory_overcommit = memory_overcommit
        self.ceiling = ceiling or Ceiling()
        self._nodes: dict[str, Summary] = {}
        # Each node's bound load: a decision reads it in O(1) (summing every binding per
        # decision made a burst quadratic: 8.5 ms of CPU per VM at 5000 VMs).
        self._loads: dict[str, Load] = {}
        # Room held for VMs on their way: key (a migration's uid) -> (node, load); sums per node.
        self._reserved: dict[str, tuple[str, Load]] = {}
        self._reserved_loads: dict[str, Load] = {}

    # --- what the watches and the bindings tell ------------------------------------------------

    def node_event(self, event_type: str | None, summary: Summary) -> None:
        if event_type == "DELETED":
            self._nodes.pop(summary["name"], None)
        else:
            self._nodes[summary["name"]] = summary

    def add(self, node: str, load: Load) -> None:
        self._loads[node] = self._loads.get(node, Load()) + load

    def remove(self, node: str, load: Load) -> None:
        self._loads[node] = self._loads.get(node, Load()) - load

    def reserve(self, key: str, node: str | None, load: Load | None = None) -> bool:
        """Hold ``load`` on ``node`` under ``key`` in place of what the key held (``node``
        None: hold nothing); returns whether room came free."""
        old = self._reserved.pop(key, None)
        if old is not None:
            self._reserved_loads[old[0]] -= old[1]
        if node is not None and load is not None:
            self._reserved[key] = (node, load)
            self._reserved_loads[node] = self._reserved_loads.get(node, Load()) + load
        return old is not None and key not in self._reserved

    # --- what decisions read -------------------------------------------------------------------

    def known(self, node: str) -> bool:
        return node in self._nodes

    def names(self) -> set[str]:
        return set(self._nodes)

    def summary(self, node: str) -> Summary | None:
        return self._nodes.get(node)

    def info(self, node: str) -> NodeInfo | None:
        summary = self._nodes.get(node)
        return None if summary is None else self._info(summary)

    def infos(self) -> list[NodeInfo]:
        return [self._info(summary) for summary in self._nodes.values()]

    def _info(self, summary: Summary) -> NodeInfo:
        return node_info(summary, self.node_lost_seconds, ceiling=self.ceiling)

    def loads(self) -> dict[str, Load]:
        """Each node's load as decisions see it: its bound VMs, and the room held for VMs on
        their way to it (none, nearly always: then no copy is made)."""
        if not self._reserved:
            return self._loads
        merged = dict(self._loads)
        for node, load in self._reserved_loads.items():
            merged[node] = merged.get(node, Load()) + load
        return merged

    def load(self, node: str) -> Load:
        return self.loads().get(node, Load())

    def place(self, request: Request, among: Callable[[NodeInfo], bool] | None = None) -> Decision:
        """The node a VM asking ``request`` goes to, among every node (or those ``among``
        keeps), or why none can take it."""
        nodes = self.infos() if among is None else [n for n in self.infos() if among(n)]
        return place(request, nodes, self.loads(), self.cpu_overcommit, self.memory_overcommit)
