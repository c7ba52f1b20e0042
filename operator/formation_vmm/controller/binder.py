"""Binding VMs to nodes, and telling the truth about VMs whose node went silent.

Fed by kopf's watch events (nodes and VMs); binds from one loop, so two placements never race
for the last free slot. Writes go straight to the API with optimistic concurrency: the status
is one metadata write: the node label (the binding of record), the agent's finalizer and the
addresses, only ever written on an unlabeled VM at the resourceVersion the decision was made
from, so no VM is bound twice. The agent's status write then says where the VM runs.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from formation_vmm import metrics
from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import VirtualMachine, VirtualMachineStatus
from formation_vmm.api.names import (
    ADDRESSES_ANNOTATION,
    DRAIN_TAINT,
    MIGRATION_ENDPOINT_ANNOTATION,
    NODE_LABEL,
    OUT_OF_SERVICE_TAINT,
    VM_KIND,
    agent_finalizer,
)
from formation_vmm.controller.networks import NetworkCatalog
from formation_vmm.controller.nodes import node_info
from formation_vmm.ipam import AddressBook, AddressesExhaustedError, assigned, encode_addresses
from formation_vmm.kube import EventRecorder, StatusWriter
from formation_vmm.placement import Decision, Load, NodeInfo, Request, place
from formation_vmm.quota import Quota, Usage, quota_of, refusal

log = logging.getLogger(__name__)

NODE_LOST_MESSAGE = "the agent on node {node} has not reported for {seconds:.0f}s; the VM's state is unknown"


# Binding writes in flight at once: enough to hide the apiserver's round trip in a burst, few
# enough to leave the client's connection pool (10 on two cores) room for everything else.
BIND_WRITERS = 8


@dataclass
class _Plan:
    """A placement decision, made under the binder's lock, and what writing it needs."""

    body: dict[str, Any]
    vm: VirtualMachine
    decision: Decision
    reason: str = "Unschedulable"
    addresses: dict[str, tuple[str, str]] = field(default_factory=dict)
    done: bool = False  # bound already: nothing to write


@dataclass
class Bound:
    """What the binder keeps of a bound VM: what it takes from its node and its quota, and
    enough to tell a lost node's VMs apart (never the whole body: at 5000 VMs the controller's
    memory is mostly what it keeps per VM)."""

    node: str
    vcpus: int
    memory: int
    namespace: str
    name: str
    generation: int | None = None
    disk: int = 0
    phase: str | None = None
    deleting: bool = False

    @property
    def usage(self) -> Usage:
        return Usage(self.vcpus, self.memory, self.disk)

    @property
    def load(self) -> Load:
        return Load(self.vcpus, self.memory, self.disk)


def _bound_from(node: str, body: dict[str, Any], vm: VirtualMachine) -> Bound:
    meta = body["metadata"]
    return Bound(
        node,
        vm.spec.vcpus,
        vm.spec.memory_bytes,
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        meta.get("generation"),
        vm.spec.disk_bytes,
        (body.get("status") or {}).get("phase"),
        bool(meta.get("deletionTimestamp")),
    )


class Binder:
    def __init__(
        self,
        status: StatusWriter[VirtualMachineStatus],
        events: EventRecorder,
        cpu_overcommit: float = 1.0,
        memory_overcommit: float = 1.0,
        node_lost_seconds: float = 40.0,
        networks: NetworkCatalog | None = None,
    ) -> None:
        self.status = status
        self.networks = networks or NetworkCatalog()
        self.addresses = AddressBook()
        # Nothing is bound before every VM's assignments are known (``seed``): a restarted
        # controller that bound from a half-delivered watch could hand out an address twice.
        self.seeded = False
        self.events = events
        self.cpu_overcommit = cpu_overcommit
        self.memory_overcommit = memory_overcommit
        self.node_lost_seconds = node_lost_seconds
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        # Nodes VMs are bound to that have no Node object: since when this process knows so.
        self._missing_since: dict[str, float] = {}
        self._bound: dict[str, Bound] = {}  # uid -> binding; changed only by _hold and _release
        # Sums over _bound, kept as it changes: a decision reads them in O(1) (summing every
        # binding per decision made a burst quadratic: 8.5 ms of CPU per VM at 5000, 5 at 1000).
        self._node_loads: dict[str, Load] = {}
        # Room held on a node for a VM on its way there (a migration from Preparing until its
        # binding moves): migration key -> (node, load), and the sums per node.
        self._reserved: dict[str, tuple[str, Load]] = {}
        self._reserved_loads: dict[str, Load] = {}
        self._namespace_usage: dict[str, Usage] = {}
        self._pending: dict[str, dict[str, Any]] = {}  # uid -> latest body of an unbound VM
        self._quotas: dict[tuple[str, str], Quota] = {}  # (namespace, ResourceQuota name) -> limits
        self.changed = threading.Event()  # set when binding could now succeed where it failed
        self._writers = ThreadPoolExecutor(max_workers=BIND_WRITERS, thread_name_prefix="bind")

    # --- the bindings and their sums (under the lock) ------------------------------------------

    def _hold(self, uid: str, bound: Bound) -> Bound | None:
        old = self._release(uid)
        self._bound[uid] = bound
        self._node_loads[bound.node] = self._node_loads.get(bound.node, Load()) + bound.load
        self._namespace_usage[bound.namespace] = (
            self._namespace_usage.get(bound.namespace, Usage()) + bound.usage
        )
        return old

    def _loads(self) -> dict[str, Load]:
        """Each node's load as decisions see it: its bound VMs, and the room held for VMs on
        their way to it (none, nearly always: then no copy is made)."""
        if not self._reserved:
            return self._node_loads
        merged = dict(self._node_loads)
        for node, load in self._reserved_loads.items():
            merged[node] = merged.get(node, Load()) + load
        return merged

    def reserve(self, key: str, node: str | None, namespace: str, vm: str) -> None:
        """Hold room on ``node`` for VM ``namespace/vm`` under ``key`` (a migration's uid) until
        called again with ``node`` None, so that no new VM, restart or other migration takes the
        last of it while the VM is on its way. Its load is that of its binding now."""
        with self._lock:
            old = self._reserved.pop(key, None)
            if old is not None:
                self._reserved_loads[old[0]] -= old[1]
            bound = None
            if node is not None:
                bound = next(
                    (b for b in self._bound.values() if b.namespace == namespace and b.name == vm), None
                )
            if node is not None and bound is not None and bound.node != node:
                self._reserved[key] = (node, bound.load)
                self._reserved_loads[node] = self._reserved_loads.get(node, Load()) + bound.load
            # (Not bound, or bound there already: its binding counts.)
            freed = old is not None and key not in self._reserved
        if freed:
            self.changed.set()  # room came free: pending VMs may fit now

    def _release(self, uid: str) -> Bound | None:
        old = self._bound.pop(uid, None)
        if old is not None:
            self._node_loads[old.node] -= old.load
            self._namespace_usage[old.namespace] -= old.usage
        return old

    # --- what the watches tell us ------------------------------------------------------------

    def node_event(self, event_type: str | None, summary: dict[str, Any]) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._nodes.pop(summary["name"], None)
                self._missing_since.setdefault(summary["name"], time.monotonic())
            else:
                self._nodes[summary["name"]] = summary
                self._missing_since.pop(summary["name"], None)
        self.changed.set()

    def quota_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            if event_type == "DELETED":
                self._quotas.pop(key, None)
            else:
                self._quotas[key] = quota_of(key[1], dict((body.get("spec") or {}).get("hard") or {}))
        self.changed.set()  # a quota raised or gone: VMs waiting on it may fit now

    def vm_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = body["metadata"].get("uid", "")
        label = (body["metadata"].get("labels") or {}).get(NODE_LABEL)
        with self._lock:
            if event_type == "DELETED":
                freed = self._release(uid)
                self._pending.pop(uid, None)
                self.addresses.release(uid)
                if freed is not None:
                    self.changed.set()
                return
            # Assignments in the status hold their addresses, bound or not (a binding cut short
            # between its two writes keeps what it was given).
            self.addresses.record(uid, assigned(body))
            if label:
                old = self._bound.get(uid)
                meta = body["metadata"]
                if old is not None and old.node == label and old.generation == meta.get("generation"):
                    # The same spec (a status write or a metadata change): no model to validate.
                    old.phase = (body.get("status") or {}).get("phase")
                    old.deleting = bool(meta.get("deletionTimestamp"))
                else:
                    new = _bound_from(label, body, VirtualMachine.model_validate(body))
                    self._hold(uid, new)
                    if old is not None and (old.vcpus > new.vcpus or old.memory > new.memory):
                        self.changed.set()  # a VM shrank: room for a pending one, perhaps
                self._pending.pop(uid, None)
            elif not body["metadata"].get("deletionTimestamp"):
                # Kept even while a binding of it is in flight: if that write loses to this newer
                # version (409), the next pass binds from it (else it would wait for yet another
                # event). A bound VM leaves the pending set with its labeled event.
                self._pending[uid] = body
                if uid not in self._bound:
                    self.changed.set()

    def seed(self, bodies: list[dict[str, Any]]) -> None:
        """Every VM as the API lists them now: their bindings and addresses, before any binding."""
        for body in bodies:
            self.vm_event("ADDED", body)
        self.seeded = True
        self.changed.set()

    def network_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        self.networks.network_event(event_type, body)
        self.changed.set()  # VMs waiting for this network may be placed now

    def namespace_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        self.networks.namespace_event(event_type, body)
        self.changed.set()

    # --- decisions ---------------------------------------------------------------------------

    def _node_infos(self) -> list[NodeInfo]:
        return [node_info(summary, self.node_lost_seconds) for summary in self._nodes.values()]

    def _quota_refusal(self, namespace: str, wanted: Usage) -> str | None:
        quotas = [quota for (ns, _), quota in self._quotas.items() if ns == namespace]
        if not quotas:
            return None
        return refusal(quotas, self._namespace_usage.get(namespace, Usage()), wanted)

    def bind_pending(self) -> None:
        """Try to bind every unbound VM, oldest first: decided one at a time under the lock (each
        decision counts the slots the ones before it took), then written together, up to
        BIND_WRITERS at once: a burst waits on the apiserver's round trips, not on ours."""
        if not self.seeded:
            return
        with self._lock:
            pending = sorted(
                self._pending.values(), key=lambda b: b["metadata"].get("creationTimestamp") or ""
            )
        metrics.PENDING.set(len(pending))
        plans = []
        for body in pending:
            try:
                plans.append(self._decide(body))
            except Exception:
                log.exception("placing %s/%s failed", body["metadata"]["namespace"], body["metadata"]["name"])
        list(self._writers.map(self._carry_out_or_log, plans))

    def bind(self, body: dict[str, Any]) -> Decision:
        return self._carry_out(self._decide(body))

    def _decide(self, body: dict[str, Any]) -> "_Plan":
        vm = VirtualMachine.model_validate(body)
        request = _request_of(vm)
        uid = vm.metadata.uid or ""
        with self._lock:
            if uid in self._bound:
                return _Plan(body, vm, Decision(self._bound[uid].node, "bound already"), done=True)
            reason = "Unschedulable"
            over = self._quota_refusal(
                vm.metadata.namespace or "", Usage(request.vcpus, request.memory, request.disk)
            )
            refused = self.networks.refusal(vm)
            addresses: dict[str, tuple[str, str]] = {}
            if over is not None:
                decision, reason = Decision(None, over), "QuotaExceeded"
            elif refused is not None:
                decision, reason = Decision(None, refused.message), refused.reason
            else:
                decision = place(
                    request, self._node_infos(), self._loads(), self.cpu_overcommit, self.memory_overcommit
                )
            if decision.node is not None:
                try:
                    addresses = self.addresses.assign(
                        uid, self.networks.interfaces(vm), self.networks.ranges()
                    )
                except AddressesExhaustedError as exc:
                    decision, reason = Decision(None, str(exc)), "AddressesExhausted"
            if decision.node is not None:
                # Count it now, so the next VM in this pass sees the slot as taken.
                self._hold(uid, _bound_from(decision.node, body, vm))
                self._pending.pop(uid, None)
        return _Plan(body, vm, decision, reason, addresses)

    def _carry_out_or_log(self, plan: "_Plan") -> None:
        try:
            self._carry_out(plan)
        except Exception:  # one VM's failure is logged; the others' writes go on
            meta = plan.body["metadata"]
            log.exception("binding %s/%s failed", meta["namespace"], meta["name"])

    def _carry_out(self, plan: "_Plan") -> Decision:
        """The write a decision needs: the binding, or the reason it could not be placed."""
        body, vm, decision = plan.body, plan.vm, plan.decision
        if plan.done:
            return decision
        if decision.node is None:
            metrics.BINDINGS.labels(plan.reason.lower()).inc()
            self._unschedulable(body, vm, decision.message, plan.reason)
            return decision
        if not self._write_binding(body, vm, decision.node, decision.message, plan.addresses):
            metrics.BINDINGS.labels("conflict").inc()
            uid = vm.metadata.uid or ""
            with self._lock:  # it changed under us: forget the slot and decide again from the watch
                self._release(uid)
                self.addresses.release(uid)
                self.addresses.record(uid, assigned(body))
            self.changed.set()  # the newer version may be in the pending set already
            return decision
        metrics.BINDINGS.labels("bound").inc()
        return decision

    def _write_binding(
        self,
        body: dict[str, Any],
        vm: VirtualMachine,
        node: str,
        why: str,
        addresses: dict[str, tuple[str, str]],
    ) -> bool:
        """True when the VM is bound to ``node``; False when it is gone or changed since the
        decision (the watch brings the truth, and the binder decides again). One write, at the
        resourceVersion the decision was made from: the node label (the binding of record), the
        agent's finalizer (the VM cannot be deleted without its agent removing the domain) and
        the addresses. The status says so in the agent's first write, as a Pod's does in the
        kubelet's; a VM is thus placed and running in two writes (decisions.md)."""
        meta = body["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if agent_finalizer(node) not in finalizers:
            finalizers.append(agent_finalizer(node))
        patch: dict[str, Any] = {"labels": {NODE_LABEL: node}, "finalizers": finalizers}
        if addresses:
            patch["annotations"] = {ADDRESSES_ANNOTATION: encode_addresses(addresses)}
        bound = self.status.patch_at_version(body, patch)
        if bound is None:
            return False
        log.debug("%s/%s bound to %s: %s", meta.get("namespace"), meta.get("name"), node, why)
        return True

    def _unschedulable(
        self, body: dict[str, Any], vm: VirtualMachine, message: str, reason: str = "Unschedulable"
    ) -> None:
        old = get_condition(vm.status.conditions, "Scheduled")
        if old is not None and old.message == message:
            return  # said already: no write, no event
        gen = vm.metadata.generation
        self.status.write(
            body,
            lambda st: VirtualMachineStatus(
                phase="Pending",
                vcpus=vm.spec.vcpus,
                message=message,
                conditions=set_condition(st.conditions, "Scheduled", False, reason, message, gen),
            ),
        )
        self.events.post(body, VM_KIND, reason, message, "Warning")

    # --- live migration ----------------------------------------------------------------------

    def migration_target(self, body: dict[str, Any], source: str, wanted: str | None) -> Decision:
        """Where a running VM may move: placed as a new VM would be (its nodeSelector, its
        tolerations, room on the node), among the other nodes whose agents take migrations;
        only ``wanted`` when the user named a node."""
        vm = VirtualMachine.model_validate(body)
        request = _request_of(vm)
        with self._lock:
            takers = {
                name
                for name, summary in self._nodes.items()
                if name != source and MIGRATION_ENDPOINT_ANNOTATION in summary.get("annotations", {})
            }
            if wanted is not None and wanted not in takers:
                return Decision(None, _not_a_target(wanted, source, wanted in self._nodes))
            nodes = [n for n in self._node_infos() if n.name in takers and wanted in (None, n.name)]
            if not nodes:
                return Decision(None, f"no node other than {source} takes migrations")
            return place(request, nodes, self._loads(), self.cpu_overcommit, self.memory_overcommit)

    def takes_migrations(self, node: str, source: str) -> bool:
        """Whether ``node`` could ever be this VM's target (room aside)."""
        with self._lock:
            summary = self._nodes.get(node)
        return (
            node != source
            and summary is not None
            and MIGRATION_ENDPOINT_ANNOTATION in summary.get("annotations", {})
        )

    def draining_nodes(self) -> set[str]:
        """Nodes tainted for a drain (``kubectl vm drain``)."""
        with self._lock:
            return {
                name
                for name, summary in self._nodes.items()
                if any(t.get("key") == DRAIN_TAINT for t in summary.get("taints", []))
            }

    def node_ready(self, node: str) -> bool:
        """The node's agent reports (its heartbeat is fresh)."""
        with self._lock:
            summary = self._nodes.get(node)
        return summary is not None and node_info(summary, self.node_lost_seconds).ready

    def move_binding(
        self, body: dict[str, Any], source: str, target: str, annotations: dict[str, str | None] | None = None
    ) -> dict[str, Any] | None:
        """Bind the VM to ``target`` in place of ``source``, in one write at the version read:
        the label and the agents' finalizers together (and ``annotations``, None removing one),
        so the VM is never bound to two nodes or to none. None when the VM changed meanwhile
        (read it again and retry)."""
        meta = body["metadata"]
        finalizers = [f for f in meta.get("finalizers") or [] if f != agent_finalizer(source)]
        if agent_finalizer(target) not in finalizers:
            finalizers.append(agent_finalizer(target))
        patch: dict[str, Any] = {"labels": {NODE_LABEL: target}, "finalizers": finalizers}
        if annotations:
            patch["annotations"] = annotations
        return self.status.patch_at_version(body, patch)

    # --- restarts on another node (a drain's Restart, a lost node) ---------------------------

    def restart_target(self, body: dict[str, Any], source: str) -> Decision:
        """Where a VM started again from its images goes: placed as a new VM would be (its
        nodeSelector and tolerations, room, a ready node), on a node other than ``source``."""
        vm = VirtualMachine.model_validate(body)
        with self._lock:
            nodes = [n for n in self._node_infos() if n.name != source]
            if not nodes:
                return Decision(None, f"there is no node other than {source}")
            return place(_request_of(vm), nodes, self._loads(), self.cpu_overcommit, self.memory_overcommit)

    def given_up_nodes(self, also: Iterable[str] = ()) -> dict[str, str]:
        """Nodes given up for lost, with why: an admin marked the node out of service
        (``node.kubernetes.io/out-of-service``) and its agent is silent past
        ``node_lost_seconds``; or VMs are bound to it (or it is one of ``also``: nodes whose
        agent something else waits for) and its Node has been gone that long (the caller
        confirms the Node is gone: a watch that has not delivered it yet looks the same)."""
        now = time.monotonic()
        with self._lock:
            found = {
                info.name: "marked out of service, and its agent is silent"
                for info in self._node_infos()
                if not info.ready and any(t.get("key") == OUT_OF_SERVICE_TAINT for t in info.taints)
            }
            for node in ({b.node for b in self._bound.values()} | set(also)) - self._nodes.keys():
                since = self._missing_since.setdefault(node, now)
                if now - since >= self.node_lost_seconds:
                    found[node] = "its Node was deleted"
            return found

    @staticmethod
    def status_needs_repair(body: dict[str, Any]) -> bool:
        """A labeled VM whose status names another node (a label changed by hand); checked on
        the raw body, as it runs for every watch event. A status that names no node yet is the
        agent's to write (its first status write follows the binding)."""
        node = (body["metadata"].get("labels") or {}).get(NODE_LABEL)
        shown = (body.get("status") or {}).get("nodeName")
        return bool(node and shown and shown != node)

    def repair_status(self, body: dict[str, Any]) -> None:
        """Make the status follow the label."""
        node = (body["metadata"].get("labels") or {}).get(NODE_LABEL)
        if node:
            self.status.write(body, lambda _: VirtualMachineStatus(node_name=node))

    # --- node health -------------------------------------------------------------------------

    def mark_lost_nodes(self) -> None:
        """VMs on a node whose agent stopped reporting become Unknown, with the reason. The agent
        rewrites their status when it comes back."""
        with self._lock:
            infos = {info.name: info for info in self._node_infos()}
            metrics.NODES_LOST.set(sum(1 for info in infos.values() if not info.ready))
            victims = [b for b in self._bound.values() if b.node in infos and not infos[b.node].ready]
        for bound in victims:
            if bound.phase in ("Unknown", None) or bound.deleting:
                continue
            # Read now: the binder keeps no bodies, and a node is lost rarely.
            body = self.status.get_or_none(bound.namespace, bound.name)
            if body is None or _label(body) != bound.node or body["metadata"].get("deletionTimestamp"):
                continue
            message = NODE_LOST_MESSAGE.format(node=bound.node, seconds=self.node_lost_seconds)
            self.status.write(body, _lost(message, body["metadata"].get("generation")))
            self.events.post(body, VM_KIND, "NodeLost", message, "Warning")


def _request_of(vm: VirtualMachine) -> Request:
    """What placing the VM asks of a node."""
    return Request(
        vcpus=vm.spec.vcpus,
        memory=vm.spec.memory_bytes,
        node_selector=vm.spec.node_selector,
        tolerations=tuple(vm.spec.tolerations),
        disk=vm.spec.disk_bytes,
    )


def _not_a_target(wanted: str, source: str, known: bool) -> str:
    if wanted == source:
        return f"the VM runs on node {source} already"
    if not known:
        return f"node {wanted} is not a hypervisor node (labeled vmm.formation.cloud/hypervisor=true)"
    return f"node {wanted} takes no migrations: its agent publishes no migration endpoint"


def _label(body: dict[str, Any]) -> str | None:
    return (body["metadata"].get("labels") or {}).get(NODE_LABEL)


def _lost(message: str, generation: int | None) -> Callable[[VirtualMachineStatus], VirtualMachineStatus]:
    def update(status: VirtualMachineStatus) -> VirtualMachineStatus:
        return VirtualMachineStatus(
            phase="Unknown",
            message=message,
            conditions=set_condition(status.conditions, "Ready", "Unknown", "NodeLost", message, generation),
        )

    return update
