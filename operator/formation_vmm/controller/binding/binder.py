"""Binding VMs to nodes, and telling the truth about VMs whose node went silent.

Fed by the informers' events (nodes, VMs, quotas, snapshots, networks); binds from one loop, so
two placements never race for the last free slot. The Binder keeps the one record of each bound
VM (``Bound``: what it takes, never its body) and the VMs waiting for a decision, and decides;
its collaborators keep the rest, each pure and used under the Binder's lock: ``NodeRoom``
(nodes, loads, placement), ``QuotaBook`` (quotas and what counts against them),
``Identities`` (addresses, MACs, QEMU uids), ``MigrationTargets`` (where a leaving VM may go)
and ``NodeLoss`` (lost and given-up nodes).

Writes go straight to the API with optimistic concurrency. A binding is one metadata write
(the node label, the binding of record; the agent's finalizer; the addresses), only ever made
on an unlabeled VM at the resourceVersion the decision was made from, so no VM is bound twice.
The agent's status write then says where the VM runs.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from formation_vmm import metrics
from formation_vmm.api.admission import Admitted, admitted_of
from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import VirtualMachine, VirtualMachineStatus
from formation_vmm.api.names import (
    ADDRESSES_ANNOTATION,
    ADMITTED_ANNOTATION,
    MACS_ANNOTATION,
    NODE_LABEL,
    QEMU_UID_ANNOTATION,
    VM_KIND,
    agent_finalizer,
)
from formation_vmm.controller.binding.admission import Refusal, change_refusal
from formation_vmm.controller.binding.identities import Identities, macs_of, wholly_admitted
from formation_vmm.controller.binding.migration_targets import MigrationTargets
from formation_vmm.controller.binding.networks import NetworkCatalog
from formation_vmm.controller.binding.node_loss import NodeLoss
from formation_vmm.controller.binding.node_room import NodeRoom
from formation_vmm.controller.binding.nodes import Ceiling
from formation_vmm.controller.binding.quota_book import QuotaBook
from formation_vmm.ipam import AddressesExhaustedError, encode_addresses
from formation_vmm.kube import EventRecorder, NotFoundError, StatusWriter
from formation_vmm.macs import MacInUseError, encode_macs, legacy_mac, recorded_macs
from formation_vmm.placement import Decision, Load, Request
from formation_vmm.qemu_uids import recorded_uid
from formation_vmm.quota import Usage

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
        self.events = events
        self.node_lost_seconds = node_lost_seconds
        self.room = NodeRoom(node_lost_seconds, cpu_overcommit, memory_overcommit, ceiling)
        self.quota = QuotaBook()
        self.ids = Identities(networks)
        self.targets = MigrationTargets(self.room)
        self.loss = NodeLoss(self.room)
        # Nothing is bound before every VM's assignments are known (``seed``): a restarted
        # controller that bound from a half-delivered watch could hand out an address twice.
        self.seeded = False
        self._lock = threading.Lock()
        self._bound: dict[str, Bound] = {}  # uid -> binding; changed only by _hold and _release
        self._pending: dict[str, dict[str, Any]] = {}  # uid -> latest body of an unbound VM
        # uid -> latest body of a bound VM whose spec changed beyond what was admitted of it.
        self._changes: dict[str, dict[str, Any]] = {}
        self.changed = threading.Event()  # set when binding could now succeed where it failed
        self._writers = ThreadPoolExecutor(max_workers=BIND_WRITERS, thread_name_prefix="bind")

    # --- the bindings and their sums (under the lock) ------------------------------------------

    def _hold(self, uid: str, bound: Bound) -> Bound | None:
        old = self._release(uid)
        self._bound[uid] = bound
        self.room.add(bound.node, bound.load)
        self.quota.charge(bound.namespace, bound.usage)
        return old

    def reserve(self, key: str, node: str | None, namespace: str, vm: str) -> None:
        """Hold room on ``node`` for VM ``namespace/vm`` under ``key`` (a migration's uid) until
        called again with ``node`` None, so that no new VM, restart or other migration takes the
        last of it while the VM is on its way. Its load is that of its binding now."""
        with self._lock:
            bound = None
            if node is not None:
                bound = next(
                    (b for b in self._bound.values() if b.namespace == namespace and b.name == vm), None
                )
            # (Not bound, or bound there already: its binding counts.)
            held_on = node if bound is not None and bound.node != node else None
            freed = self.room.reserve(key, held_on, bound.load if bound is not None else None)
        if freed:
            self.changed.set()  # room came free: pending VMs may fit now

    def _release(self, uid: str) -> Bound | None:
        old = self._bound.pop(uid, None)
        if old is not None:
            self.room.remove(old.node, old.load)
            self.quota.refund(old.namespace, old.usage)
        return old

    # --- what the watches tell us ------------------------------------------------------------

    def node_event(self, event_type: str | None, summary: dict[str, Any]) -> None:
        with self._lock:
            self.room.node_event(event_type, summary)
            self.loss.node_event(event_type, summary["name"], time.monotonic())
        self.changed.set()

    def quota_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        with self._lock:
            self.quota.quota_event(event_type, body)
        self.changed.set()  # a quota raised or gone: VMs waiting on it may fit now

    def snapshot_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        """A VmSnapshot's bytes (``status.size`` once Ready) count in its namespace's disk quota."""
        with self._lock:
            freed = self.quota.snapshot_event(event_type, body)
        if freed:
            self.changed.set()  # disk came free: VMs waiting on the quota may fit now

    def vm_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = body["metadata"].get("uid", "")
        label = (body["metadata"].get("labels") or {}).get(NODE_LABEL)
        with self._lock:
            if event_type == "DELETED":
                freed = self._release(uid)
                self._pending.pop(uid, None)
                self._changes.pop(uid, None)
                self.ids.release(uid)
                if freed is not None:
                    self.changed.set()
                return
            self.ids.record(uid, body)
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
                    if wholly_admitted(body, vm):
                        self.ids.macs.record(uid, macs_of(vm))
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
            self.ids.networks.network_event(event_type, body)
        self.changed.set()  # VMs waiting for this network may be placed now

    def namespace_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        with self._lock:
            self.ids.networks.namespace_event(event_type, body)
        self.changed.set()

    # --- decisions ---------------------------------------------------------------------------

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
                refused = change_refusal(
                    _request_of(vm),
                    bound.load,
                    self.room.info(bound.node),
                    self.room.load(bound.node),
                    self.quota.quotas(bound.namespace),
                    self.quota.used(bound.namespace),
                    self.room.cpu_overcommit,
                    self.room.memory_overcommit,
                )
                network = self.ids.refusal(vm) if refused is None else None
                if network is not None:
                    refused = Refusal(network.reason, network.message)
            if refused is not None:
                return _ChangePlan(body, vm, refused)
            kept = recorded_macs(annotations)
            if legacy:  # the MACs its domain was defined with are its own
                kept = {n.name: legacy_mac(uid, n.name) for n in vm.spec.networks} | kept
            try:
                macs, addresses = self.ids.assign(uid, vm, kept)
            except MacInUseError as exc:
                self.ids.as_recorded(uid, body)  # nothing new held; the admitted ones as recorded
                return _ChangePlan(body, vm, Refusal("MacAddressInUse", self._mac_refusal(vm, exc)))
            except AddressesExhaustedError as exc:
                self.ids.as_recorded(uid, body)
                return _ChangePlan(body, vm, Refusal("AddressesExhausted", str(exc)))
            admitted = admitted_of(vm.spec)
            # Counted at once, so that the next judgement sees the room as taken.
            self._hold(uid, _bound_from(bound.node, body, vm, admitted))
            self._changes.pop(uid, None)
        return _ChangePlan(body, vm, None, admitted, addresses, macs)

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
                self.ids.as_recorded(uid, body)
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
            over = self.quota.refusal(
                vm.metadata.namespace or "", Usage(request.vcpus, request.memory, request.disk)
            )
            refused = self.ids.refusal(vm)
            addresses: dict[str, tuple[str, str]] = {}
            if over is not None:
                decision, reason = Decision(None, over), "QuotaExceeded"
            elif refused is not None:
                decision, reason = Decision(None, refused.message), refused.reason
            else:
                decision = self.room.place(request)
            macs: dict[str, str] = {}
            qemu_uid: int | None = None
            if decision.node is not None:
                qemu_uid = self.ids.assign_uid(uid)
                try:
                    macs, addresses = self.ids.assign(uid, vm, {})
                except MacInUseError as exc:
                    decision, reason = Decision(None, self._mac_refusal(vm, exc)), "MacAddressInUse"
                except AddressesExhaustedError as exc:
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
            self.ids.unbind(uid, plan.body)
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
                self.ids.unbind(uid, body)
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
        """Where a running VM may move (MigrationTargets.live)."""
        request = _request_of(VirtualMachine.model_validate(body))
        with self._lock:
            return self.targets.live(request, source, wanted)

    def takes_migrations(self, node: str, source: str) -> bool:
        with self._lock:
            return self.targets.takes_migrations(node, source)

    def draining_nodes(self) -> set[str]:
        with self._lock:
            return self.targets.draining()

    def node_ready(self, node: str) -> bool:
        """The node's agent reports (its heartbeat is fresh)."""
        with self._lock:
            info = self.room.info(node)
        return info is not None and info.ready

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
        """Where a VM started again from its images goes (MigrationTargets.restart)."""
        request = _request_of(VirtualMachine.model_validate(body))
        with self._lock:
            return self.targets.restart(request, source)

    def given_up_nodes(self, also: Iterable[str] = ()) -> dict[str, str]:
        """Nodes given up for lost, with why (NodeLoss.given_up): among the nodes VMs are bound
        to and ``also`` (nodes whose agent something else waits for)."""
        with self._lock:
            needed = {b.node for b in self._bound.values()} | set(also)
            return self.loss.given_up(needed, time.monotonic())

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
            lost = self.loss.lost()
            metrics.NODES_LOST.set(len(lost))
            victims = [b for b in self._bound.values() if b.node in lost]
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
