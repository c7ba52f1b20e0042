"""Binding VMs to nodes, and telling the truth about VMs whose node went silent.

Fed by kopf's watch events (nodes and VMs); binds from one loop, so two placements never race
for the last free slot. Writes go straight to the API with optimistic concurrency: the status
(Scheduled, nodeName) first, then the node label, which is the binding of record and is only
ever written on an unlabeled VM at the resourceVersion the decision was made from. A controller
killed between the two writes finds the VM unlabeled and binds it afresh; no VM is bound twice.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from formation_vmm import metrics
from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import InterfaceStatus, VirtualMachine, VirtualMachineStatus
from formation_vmm.api.names import (
    AGENT_ENDPOINT_ANNOTATION,
    DEFAULT_NETWORK,
    NODE_LABEL,
    VM_KIND,
    agent_finalizer,
)
from formation_vmm.controller.networks import NetworkCatalog
from formation_vmm.controller.nodes import node_info
from formation_vmm.domain.build import interface_mac
from formation_vmm.ipam import IPAM, AddressBook, AddressesExhaustedError, assigned
from formation_vmm.kube import EventRecorder, StatusWriter
from formation_vmm.placement import Decision, Load, NodeInfo, Request, place
from formation_vmm.quota import Quota, Usage, quota_of, refusal

log = logging.getLogger(__name__)

NODE_LOST_MESSAGE = "the agent on node {node} has not reported for {seconds:.0f}s; the VM's state is unknown"


@dataclass
class Bound:
    node: str
    vcpus: int
    memory: int
    body: dict[str, Any]
    disk: int = 0

    @property
    def namespace(self) -> str:
        return str(self.body["metadata"].get("namespace", ""))

    @property
    def usage(self) -> Usage:
        return Usage(self.vcpus, self.memory, self.disk)


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
        self._bound: dict[str, Bound] = {}  # uid -> binding
        self._pending: dict[str, dict[str, Any]] = {}  # uid -> latest body of an unbound VM
        self._quotas: dict[tuple[str, str], Quota] = {}  # (namespace, ResourceQuota name) -> limits
        self.changed = threading.Event()  # set when binding could now succeed where it failed

    # --- what the watches tell us ------------------------------------------------------------

    def node_event(self, event_type: str | None, summary: dict[str, Any]) -> None:
        with self._lock:
            if event_type == "DELETED":
                self._nodes.pop(summary["name"], None)
            else:
                self._nodes[summary["name"]] = summary
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
                freed = self._bound.pop(uid, None)
                self._pending.pop(uid, None)
                self.addresses.release(uid)
                if freed is not None:
                    self.changed.set()
                return
            # Assignments in the status hold their addresses, bound or not (a binding cut short
            # between its two writes keeps what it was given).
            self.addresses.record(uid, assigned(body))
            if label:
                vm = VirtualMachine.model_validate(body)
                old = self._bound.get(uid)
                self._bound[uid] = Bound(label, vm.spec.vcpus, vm.spec.memory_bytes, body, vm.spec.disk_bytes)
                self._pending.pop(uid, None)
                if old is not None and (old.vcpus > vm.spec.vcpus or old.memory > vm.spec.memory_bytes):
                    self.changed.set()  # a VM shrank: room for a pending one, perhaps
            elif uid not in self._bound and not body["metadata"].get("deletionTimestamp"):
                # (A VM we are binding right now shows up unlabeled once, after its status write.)
                self._pending[uid] = body
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

    def _endpoint(self, node: str) -> str | None:
        with self._lock:
            annotations = (self._nodes.get(node) or {}).get("annotations") or {}
        return annotations.get(AGENT_ENDPOINT_ANNOTATION)

    def _node_infos(self) -> list[NodeInfo]:
        return [node_info(summary, self.node_lost_seconds) for summary in self._nodes.values()]

    def _loads(self) -> dict[str, Load]:
        loads: dict[str, Load] = {}
        for bound in self._bound.values():
            cur = loads.get(bound.node, Load())
            loads[bound.node] = Load(
                cur.vcpus + bound.vcpus, cur.memory + bound.memory, cur.disk + bound.disk
            )
        return loads

    def _quota_refusal(self, namespace: str, wanted: Usage) -> str | None:
        quotas = [quota for (ns, _), quota in self._quotas.items() if ns == namespace]
        if not quotas:
            return None
        used = sum((b.usage for b in self._bound.values() if b.namespace == namespace), Usage())
        return refusal(quotas, used, wanted)

    def bind_pending(self) -> None:
        """Try to bind every unbound VM, oldest first."""
        if not self.seeded:
            return
        with self._lock:
            pending = sorted(
                self._pending.values(), key=lambda b: b["metadata"].get("creationTimestamp") or ""
            )
        metrics.PENDING.set(len(pending))
        for body in pending:
            try:
                self.bind(body)
            except Exception:
                log.exception("binding %s/%s failed", body["metadata"]["namespace"], body["metadata"]["name"])

    def bind(self, body: dict[str, Any]) -> Decision:
        vm = VirtualMachine.model_validate(body)
        request = Request(
            vcpus=vm.spec.vcpus,
            memory=vm.spec.memory_bytes,
            node_selector=vm.spec.node_selector,
            tolerations=tuple(vm.spec.tolerations),
            disk=vm.spec.disk_bytes,
        )
        uid = vm.metadata.uid or ""
        with self._lock:
            if uid in self._bound:
                return Decision(self._bound[uid].node, "bound already")
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
                self._bound[uid] = Bound(decision.node, request.vcpus, request.memory, body, request.disk)
                self._pending.pop(uid, None)
        if decision.node is None:
            metrics.BINDINGS.labels(reason.lower()).inc()
            self._unschedulable(body, vm, decision.message, reason)
            return decision
        if not self._write_binding(body, vm, decision.node, decision.message, addresses):
            metrics.BINDINGS.labels("conflict").inc()
            with self._lock:  # it changed under us: forget the slot and decide again from the watch
                self._bound.pop(uid, None)
                self.addresses.release(uid)
                self.addresses.record(uid, assigned(body))
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
        """True when the VM is bound to ``node`` (now, or by an earlier run of ours); False when
        it is gone or was bound elsewhere meanwhile (the watch brings the truth). The addresses
        go in the first write: the IP column shows them from the moment the VM is placed."""
        gen = vm.metadata.generation
        written = self.status.write(
            body,
            lambda st: VirtualMachineStatus(
                phase="Scheduled",
                node_name=node,
                agent_endpoint=self._endpoint(node),
                vcpus=vm.spec.vcpus,
                message=f"scheduled on {node}",
                conditions=set_condition(st.conditions, "Scheduled", True, "Scheduled", why, gen),
                interfaces=planned_interfaces(vm, addresses),
            ),
            guard=lambda current: not _label(current),
        )
        if written is None:
            return False  # deleted meanwhile
        if _label(written):
            return _label(written) == node  # bound before this write: by us earlier, or elsewhere
        # The agent's finalizer comes with the binding, in the same write: the VM cannot be
        # deleted without its agent removing the domain, and the agent saves a write of its own.
        finalizers = list(written["metadata"].get("finalizers") or [])
        if agent_finalizer(node) not in finalizers:
            finalizers.append(agent_finalizer(node))
        bound = self.status.patch_at_version(
            written, {"labels": {NODE_LABEL: node}, "finalizers": finalizers}
        )
        if bound is None:
            return False
        self.events.post(body, VM_KIND, "Scheduled", f"bound to node {node}")
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

    @staticmethod
    def status_needs_repair(body: dict[str, Any]) -> bool:
        """A labeled VM whose status does not name its node, or shows stale vCPUs (a hand-made
        label, or a spec change); checked on the raw body, as it runs for every watch event."""
        node = (body["metadata"].get("labels") or {}).get(NODE_LABEL)
        if not node:
            return False
        status = body.get("status") or {}
        return bool(
            status.get("nodeName") != node
            or status.get("vcpus") != VirtualMachine.model_validate(body).spec.vcpus
        )

    def repair_status(self, body: dict[str, Any]) -> None:
        """Make the status follow the label and the spec."""
        vm = VirtualMachine.model_validate(body)
        node = vm.metadata.labels.get(NODE_LABEL)
        if node:
            self.status.write(body, lambda _: VirtualMachineStatus(node_name=node, vcpus=vm.spec.vcpus))

    # --- node health -------------------------------------------------------------------------

    def mark_lost_nodes(self) -> None:
        """VMs on a node whose agent stopped reporting become Unknown, with the reason. The agent
        rewrites their status when it comes back."""
        with self._lock:
            infos = {info.name: info for info in self._node_infos()}
            metrics.NODES_LOST.set(sum(1 for info in infos.values() if not info.ready))
            victims = [b for b in self._bound.values() if b.node in infos and not infos[b.node].ready]
        for bound in victims:
            status = bound.body.get("status") or {}
            if status.get("phase") in ("Unknown", None) or bound.body["metadata"].get("deletionTimestamp"):
                continue
            message = NODE_LOST_MESSAGE.format(node=bound.node, seconds=self.node_lost_seconds)
            self.status.write(bound.body, _lost(message, bound.body["metadata"].get("generation")))
            self.events.post(bound.body, VM_KIND, "NodeLost", message, "Warning")


def planned_interfaces(vm: VirtualMachine, addresses: dict[str, tuple[str, str]]) -> list[InterfaceStatus]:
    """The interfaces as placement decides them: MAC, network and the assigned address."""
    result = []
    for net in vm.spec.networks:
        entry = InterfaceStatus(
            name=net.name,
            mac=interface_mac(vm, net),
            network=net.network or DEFAULT_NETWORK,
        )
        if net.name in addresses:
            entry.ip_address = addresses[net.name][1]
            entry.info_source = IPAM
        result.append(entry)
    return result


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
