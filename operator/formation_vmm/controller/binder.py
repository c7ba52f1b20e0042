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
from formation_vmm.api.admission import Admitted, admitted_of, change_held
from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import VirtualMachine, VirtualMachineStatus
from formation_vmm.api.names import (
    ADDRESSES_ANNOTATION,
    ADMITTED_ANNOTATION,
    DEFAULT_NETWORK,
    DRAIN_TAINT,
    MACS_ANNOTATION,
    MIGRATION_ENDPOINT_ANNOTATION,
    NODE_LABEL,
    OUT_OF_SERVICE_TAINT,
    QEMU_UID_ANNOTATION,
    VM_KIND,
    agent_finalizer,
)
from formation_vmm.controller.admission import Refusal, change_refusal
from formation_vmm.controller.networks import NetworkCatalog
from formation_vmm.controller.nodes import Ceiling, node_info
from formation_vmm.domain.build import interface_mac
from formation_vmm.ipam import AddressBook, AddressesExhaustedError, assigned, encode_addresses
from formation_vmm.kube import EventRecorder, NotFoundError, StatusWriter
from formation_vmm.macs import MacBook, MacInUseError, encode_macs, legacy_mac, recorded_macs
from formation_vmm.placement import Decision, Load, NodeInfo, Request, place
from formation_vmm.qemu_uids import UidBook, recorded_uid
from formation_vmm.quota import Quota, Usage, quota_of, refusal

log = logging.getLogger(__name__)

NODE_LOST_MESSAGE = "the agent on node {node} has not reported for {seconds:.0f}s; the VM's state is unknown"
# The controller's condition on a bound VM whose spec changed: whether the change was admitted.
SPEC_ACCEPTED = "SpecAccepted"


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
    macs: dict[str, str] = field(default_factory=dict)
    qemu_uid: int | None = None
    done: bool = False  # bound already: nothing to write


@dataclass
class _ChangePlan:
    """A judged change of a bound VM's spec: admitted (the record to write) or refused."""

    body: dict[str, Any]
    vm: VirtualMachine
    refusal: Refusal | None = None
    admitted: Admitted | None = None
    addresses: dict[str, tuple[str, str]] = field(default_factory=dict)
    macs: dict[str, str] = field(default_factory=dict)


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
    admitted: str | None = None  # the record as read (vmm.formation.cloud/admitted)

    @property
    def usage(self) -> Usage:
        return Usage(self.vcpus, self.memory, self.disk)

    @property
    def load(self) -> Load:
        return Load(self.vcpus, self.memory, self.disk)


def _bound_from(
    node: str, body: dict[str, Any], vm: VirtualMachine, admitted: Admitted | None = None
) -> Bound:
    """What the VM takes: what was admitted of it (its record, or ``admitted``), else, for a VM
    bound before records existed, what its spec asks."""
    meta = body["metadata"]
    raw = (meta.get("annotations") or {}).get(ADMITTED_ANNOTATION)
    record = admitted or Admitted.decode(raw) or admitted_of(vm.spec)
    return Bound(
        node,
        record.vcpus,
        record.memory,
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        meta.get("generation"),
        record.disk,
        (body.get("status") or {}).get("phase"),
        bool(meta.get("deletionTimestamp")),
        admitted.encode() if admitted is not None else raw,
    )


def _held(body: dict[str, Any], vm: VirtualMachine) -> bool:
    """Whether the VM's spec is not (or not wholly) admitted: no record, or one for another
    digest."""
    annotations = body["metadata"].get("annotations") or {}
    return ADMITTED_ANNOTATION not in annotations or change_held(annotations, vm.spec)


class Binder:
    def __init__(
        self,
        status: StatusWriter[VirtualMachineStatus],
        events: EventRecorder,
        cpu_overcommit: float = 1.0,
        memory_overcommit: float = 1.0,
        node_lost_seconds: float = 40.0,
        networks: NetworkCatalog | None = None,
        ceiling: Ceiling | None = None,
    ) -> None:
        self.status = status
        self.ceiling = ceiling or Ceiling()
        self.networks = networks or NetworkCatalog()
        self.addresses = AddressBook()
        self.macs = MacBook()
        self.qemu_uids = UidBook()
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
        # Ready snapshots' bytes, charged to their namespace's disk: uid -> (namespace, bytes),
        # and the sums per namespace.
        self._snapshots: dict[str, tuple[str, int]] = {}
        self._snapshot_bytes: dict[str, int] = {}
        self._pending: dict[str, dict[str, Any]] = {}  # uid -> latest body of an unbound VM
        # uid -> latest body of a bound VM whose spec changed beyond what was admitted of it.
        self._changes: dict[str, dict[str, Any]] = {}
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

    def snapshot_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A VmSnapshot's bytes (``status.size`` once Ready) count in its namespace's disk quota."""
        meta = body["metadata"]
        status = body.get("status") or {}
        size = status.get("size") if status.get("phase") == "Ready" else None
        counted = (str(meta.get("namespace", "")), size if isinstance(size, int) and size > 0 else 0)
        with self._lock:
            old = self._snapshots.pop(str(meta.get("uid", "")), None)
            if old is not None:
                self._snapshot_bytes[old[0]] -= old[1]
            if event_type != "DELETED" and counted[1]:
                self._snapshots[str(meta.get("uid", ""))] = counted
                self._snapshot_bytes[counted[0]] = self._snapshot_bytes.get(counted[0], 0) + counted[1]
        if old is not None and (event_type == "DELETED" or counted[1] < old[1]):
            self.changed.set()  # disk came free: VMs waiting on the quota may fit now

    def _usage(self, namespace: str) -> Usage:
        """What a namespace's quota counts as used (under the lock): its bound VMs, and its
        snapshots' bytes as disk."""
        return self._namespace_usage.get(namespace, Usage()) + Usage(
            disk=self._snapshot_bytes.get(namespace, 0)
        )

    def vm_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = body["metadata"].get("uid", "")
        label = (body["metadata"].get("labels") or {}).get(NODE_LABEL)
        with self._lock:
            if event_type == "DELETED":
                freed = self._release(uid)
                self._pending.pop(uid, None)
                self._changes.pop(uid, None)
                self.addresses.release(uid)
                self.macs.release(uid)
                self.qemu_uids.release(uid)
                if freed is not None:
                    self.changed.set()
                return
            self.qemu_uids.record(uid, recorded_uid(body["metadata"].get("annotations") or {}))
            # The addresses annotation (the IPAM record) holds its addresses, bound or not; one
            # outside its network's range is not believed.
            self.addresses.record(uid, assigned(body), self.networks.ranges())
            if label:
                old = self._bound.get(uid)
                meta = body["metadata"]
                record = (meta.get("annotations") or {}).get(ADMITTED_ANNOTATION)
                if (
                    old is not None
                    and old.node == label
                    and old.generation == meta.get("generation")
                    and old.admitted == record
                ):
                    # The same spec and record (a status write, another metadata change): no
                    # model to validate.
                    old.phase = (body.get("status") or {}).get("phase")
                    old.deleting = bool(meta.get("deletionTimestamp"))
                    if uid in self._changes:
                        self._changes[uid] = body  # judged and written from the latest version
                else:
                    vm = VirtualMachine.model_validate(body)
                    new = _bound_from(label, body, vm)
                    self._hold(uid, new)
                    if old is not None and (old.vcpus > new.vcpus or old.memory > new.memory):
                        self.changed.set()  # a VM shrank: room for a pending one, perhaps
                    if not _held(body, vm):
                        self.macs.record(uid, self._macs_of(vm))
                        self._changes.pop(uid, None)
                    elif not new.deleting:
                        self._changes[uid] = body  # judged by the next pass (admit_changes)
                        self.changed.set()
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
        with self._lock:  # the networks' and the namespaces' watches run in threads of their own
            self.networks.network_event(event_type, body)
        self.changed.set()  # VMs waiting for this network may be placed now

    def namespace_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        with self._lock:
            self.networks.namespace_event(event_type, body)
        self.changed.set()

    # --- decisions ---------------------------------------------------------------------------

    def _node_infos(self) -> list[NodeInfo]:
        return [self._node_info(summary) for summary in self._nodes.values()]

    def _node_info(self, summary: dict[str, Any]) -> NodeInfo:
        return node_info(summary, self.node_lost_seconds, ceiling=self.ceiling)

    def _quota_refusal(self, namespace: str, wanted: Usage) -> str | None:
        quotas = [quota for (ns, _), quota in self._quotas.items() if ns == namespace]
        if not quotas:
            return None
        return refusal(quotas, self._usage(namespace), wanted)

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

    # --- changes of bound VMs ------------------------------------------------------------------

    def admit_changes(self) -> None:
        """Judge every bound VM whose spec changed beyond what was admitted of it, as a new VM
        is judged (quota, room on its node, networks, MACs, addresses for new interfaces), and
        write the outcome: the new record, or why the change waits (condition SpecAccepted,
        and an event). A held change is not applied by the agent; it is judged again whenever
        something changes, as a pending VM is."""
        if not self.seeded:
            return
        with self._lock:
            waiting = list(self._changes.values())
        for body in waiting:
            meta = body["metadata"]
            try:
                plan = self._judge(body)
                if plan is not None:
                    self._carry_out_change(plan)
            except Exception:  # one VM's failure is logged; the others go on
                log.exception("admitting the change of %s/%s failed", meta.get("namespace"), meta.get("name"))

    def _judge(self, body: dict[str, Any]) -> _ChangePlan | None:
        vm = VirtualMachine.model_validate(body)
        uid = vm.metadata.uid or ""
        annotations = vm.metadata.annotations
        with self._lock:
            bound = self._bound.get(uid)
            if bound is None or bound.deleting or self._changes.get(uid) is not body:
                return None  # unbound, going, or a newer version is waiting
            legacy = ADMITTED_ANNOTATION not in annotations
            refused: Refusal | None = None
            if not legacy:  # a VM bound before records existed runs as it is: recorded, not judged
                summary = self._nodes.get(bound.node)
                refused = change_refusal(
                    _request_of(vm),
                    bound.load,
                    self._node_info(summary) if summary is not None else None,
                    self._loads().get(bound.node, Load()),
                    [quota for (ns, _), quota in self._quotas.items() if ns == bound.namespace],
                    self._usage(bound.namespace),
                    self.cpu_overcommit,
                    self.memory_overcommit,
                )
                network = self.networks.refusal(vm) if refused is None else None
                if network is not None:
                    refused = Refusal(network.reason, network.message)
            if refused is not None:
                return _ChangePlan(body, vm, refused)
            kept = recorded_macs(annotations)
            if legacy:  # the MACs its domain was defined with are its own
                kept = {n.name: legacy_mac(uid, n.name) for n in vm.spec.networks} | kept
            try:
                macs = self.macs.assign(uid, _mac_asks(vm), kept)
                addresses = self.addresses.assign(uid, self.networks.interfaces(vm), self.networks.ranges())
            except MacInUseError as exc:
                self.macs.record(uid, {})  # nothing new held; the admitted ones come back with the record
                self._restore_records(uid, body)
                return _ChangePlan(body, vm, Refusal("MacAddressInUse", self._mac_refusal(vm, exc)))
            except AddressesExhaustedError as exc:
                self._restore_records(uid, body)
                return _ChangePlan(body, vm, Refusal("AddressesExhausted", str(exc)))
            admitted = admitted_of(vm.spec)
            # Counted at once, so that the next judgement sees the room as taken.
            self._hold(uid, _bound_from(bound.node, body, vm, admitted))
            self._changes.pop(uid, None)
        return _ChangePlan(body, vm, None, admitted, addresses, macs)

    def _restore_records(self, uid: str, body: dict[str, Any]) -> None:
        """The VM's addresses and MACs as its record says (a judgement that assigned some and
        then refused, or a write that lost to a newer version). Under the lock."""
        self.addresses.release(uid)
        self.addresses.record(uid, assigned(body), self.networks.ranges())
        vm = VirtualMachine.model_validate(body)
        if not _held(body, vm):
            self.macs.record(uid, self._macs_of(vm))
        else:
            recorded = recorded_macs(vm.metadata.annotations)
            networks = {n.name: n.network or DEFAULT_NETWORK for n in vm.spec.networks}
            self.macs.record(uid, {i: (networks[i], m) for i, m in recorded.items() if i in networks})

    def _carry_out_change(self, plan: _ChangePlan) -> None:
        body, vm = plan.body, plan.vm
        meta = body["metadata"]
        shown = get_condition(vm.status.conditions, SPEC_ACCEPTED)
        if plan.refusal is not None:
            message = f"the change waits, the VM runs as it was admitted: {plan.refusal.message}"
            if shown is None or shown.status != "False" or shown.message != message:
                self._spec_accepted(body, vm, False, plan.refusal.reason, message)
                self.events.post(body, VM_KIND, plan.refusal.reason, message, "Warning")
            return
        assert plan.admitted is not None
        annotations = {
            ADMITTED_ANNOTATION: plan.admitted.encode(),
            ADDRESSES_ANNOTATION: None,
            MACS_ANNOTATION: None,
        }
        if plan.addresses:
            annotations[ADDRESSES_ANNOTATION] = encode_addresses(plan.addresses)
        if plan.macs:
            annotations[MACS_ANNOTATION] = encode_macs(plan.macs)
        if self.status.patch_at_version(body, {"annotations": annotations}) is None:
            uid = vm.metadata.uid or ""
            with self._lock:  # it changed under us: its record as it is, judged again from the watch
                if uid in self._bound:
                    self._hold(uid, _bound_from(self._bound[uid].node, body, vm))
                self._restore_records(uid, body)
                self._changes.setdefault(uid, body)
            self.changed.set()
            return
        log.info("%s/%s: spec change admitted", meta.get("namespace"), meta.get("name"))
        if shown is not None and shown.status != "True":
            self._spec_accepted(body, vm, True, "Admitted", "the spec as it is now is admitted")

    def _spec_accepted(
        self, body: dict[str, Any], vm: VirtualMachine, ok: bool, reason: str, message: str
    ) -> None:
        gen = vm.metadata.generation
        self.status.write(
            body,
            lambda st: VirtualMachineStatus(
                conditions=set_condition(st.conditions, SPEC_ACCEPTED, ok, reason, message, gen)
            ),
        )

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
            macs: dict[str, str] = {}
            qemu_uid: int | None = None
            if decision.node is not None:
                qemu_uid = self.qemu_uids.assign(uid)
                try:
                    macs = self.macs.assign(uid, _mac_asks(vm), {})
                    addresses = self.addresses.assign(
                        uid, self.networks.interfaces(vm), self.networks.ranges()
                    )
                except MacInUseError as exc:
                    decision, reason = Decision(None, self._mac_refusal(vm, exc)), "MacAddressInUse"
                except AddressesExhaustedError as exc:
                    self.macs.release(uid)
                    decision, reason = Decision(None, str(exc)), "AddressesExhausted"
            if decision.node is not None:
                # Count it now, so the next VM in this pass sees the slot as taken.
                self._hold(uid, _bound_from(decision.node, body, vm, admitted_of(vm.spec)))
                self._pending.pop(uid, None)
        return _Plan(body, vm, decision, reason, addresses, macs, qemu_uid)

    def _mac_refusal(self, vm: VirtualMachine, exc: MacInUseError) -> str:
        """Says whose the MAC is: by name within the namespace, not beyond it."""
        holder = self._bound.get(exc.holder)
        if holder is not None and holder.namespace == vm.metadata.namespace:
            owner = f"VM {holder.name}"
        else:
            owner = "a VM of another namespace"
        return (
            f"interface {exc.interface!r} asks for MAC {exc.mac}, which {owner} holds on network "
            f"{exc.network!r}: a MAC is unique on its network"
        )

    def _macs_of(self, vm: VirtualMachine) -> dict[str, tuple[str, str]]:
        """iface -> (network, MAC) of an admitted VM, as its domain has them."""
        return {
            net.name: (net.network or DEFAULT_NETWORK, interface_mac(vm, net)) for net in vm.spec.networks
        }

    def _carry_out_or_log(self, plan: "_Plan") -> None:
        try:
            self._carry_out(plan)
        except Exception as exc:  # one VM's failure is logged; the others' writes go on
            meta = plan.body["metadata"]
            log.exception("binding %s/%s failed; it is decided again", meta["namespace"], meta["name"])
            if plan.decision.node is not None and not plan.done:
                self._undo(plan, gone=isinstance(exc, NotFoundError))

    def _undo(self, plan: "_Plan", gone: bool) -> None:
        """A binding write that failed (the API away; an admission policy not configured yet
        after the apiserver restarted, which CI met): what the decision held goes back, and the
        VM waits to be decided again at the next pass, unless it is gone."""
        uid = plan.vm.metadata.uid or ""
        with self._lock:
            self._release(uid)
            self.addresses.release(uid)
            self.addresses.record(uid, assigned(plan.body), self.networks.ranges())
            self.macs.release(uid)
            self.qemu_uids.release(uid)
            if not gone:
                self._pending.setdefault(uid, plan.body)  # a newer version from the watch wins
        self.changed.set()

    def _carry_out(self, plan: "_Plan") -> Decision:
        """The write a decision needs: the binding, or the reason it could not be placed."""
        body, vm, decision = plan.body, plan.vm, plan.decision
        if plan.done:
            return decision
        if decision.node is None:
            metrics.BINDINGS.labels(plan.reason.lower()).inc()
            self._unschedulable(body, vm, decision.message, plan.reason)
            return decision
        if not self._write_binding(
            body, vm, decision.node, decision.message, plan.addresses, plan.macs, plan.qemu_uid
        ):
            metrics.BINDINGS.labels("conflict").inc()
            uid = vm.metadata.uid or ""
            with self._lock:  # it changed under us: forget the slot and decide again from the watch
                self._release(uid)
                self.addresses.release(uid)
                self.addresses.record(uid, assigned(body), self.networks.ranges())
                self.macs.release(uid)
                self.qemu_uids.release(uid)
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
        macs: dict[str, str],
        qemu_uid: int | None = None,
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
        annotations = {ADMITTED_ANNOTATION: admitted_of(vm.spec).encode()}
        if addresses:
            annotations[ADDRESSES_ANNOTATION] = encode_addresses(addresses)
        if macs:
            annotations[MACS_ANNOTATION] = encode_macs(macs)
        if qemu_uid is not None and recorded_uid(meta.get("annotations") or {}) is None:
            annotations[QEMU_UID_ANNOTATION] = str(qemu_uid)
        patch: dict[str, Any] = {
            "labels": {NODE_LABEL: node},
            "finalizers": finalizers,
            "annotations": annotations,
        }
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
        return summary is not None and self._node_info(summary).ready

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


def _mac_asks(vm: VirtualMachine) -> list[tuple[str, str, str | None]]:
    """(interface, network, the MAC its spec names or None) of each interface."""
    return [(net.name, net.network or DEFAULT_NETWORK, net.mac_address) for net in vm.spec.networks]


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
