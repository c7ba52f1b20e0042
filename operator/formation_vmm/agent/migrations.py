"""This node's part in live migrations (docs/migration.md): as the target, it prepares the VM's
files and a stopped definition of its domain; as the source, it has libvirt copy the running
guest there, follows the copy, cancels it when told or when it runs too long, and removes the VM's
files once the guest runs on the target. The controller schedules migrations and moves the
binding; the two agents each write their phase of the VmMigration's status.

Each migration's work runs in a thread of this component's own (a copy lasts seconds to
minutes; kopf's and the sync's threads stay free). A mark on disk (migration_marks) holds the VM
against its node's sync and orphan sweep for as long as the migration may still need it."""

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.hypervisor import migration as libvirt_migration
from formation_vmm.agent.inputs import InputNotReadyError
from formation_vmm.agent.migration_marks import Mark, MigrationMarks
from formation_vmm.agent.reconcile import Reconciler
from formation_vmm.agent.relay import Relay, RelayError, Route, Stream
from formation_vmm.agent.sync import VmSync
from formation_vmm.agent.watch import VmCache
from formation_vmm.api.conditions import now
from formation_vmm.api.models import (
    MigrationProgress,
    VirtualMachine,
    VirtualMachineStatus,
    VmMigration,
    VmMigrationStatus,
)
from formation_vmm.api.names import MIGRATION_ENDPOINT_ANNOTATION, MIGRATION_KIND, MIGRATION_PLURAL, VM_PLURAL
from formation_vmm.domain.naming import domain_name
from formation_vmm.kube import EventRecorder, Kube, NotFoundError, StatusWriter
from formation_vmm.migration_rules import Limits, ProgressWatch, completion_timeout, progress_summary

log = logging.getLogger(__name__)

Body = dict[str, Any]
Poke = Callable[[str], None]

# How often a running copy is looked at, and how often its progress is written.
POLL_SECONDS = 0.5
PROGRESS_WRITE_SECONDS = 2.0
# A target still fetching a base looks again this soon.
PREPARE_RETRY_SECONDS = 2.0


class MigrationError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Endpoint:
    """How the source reaches the target: through the target agent's relay (its address and
    the certificate it shows), or, on one machine, straight to its libvirtd with the copy's
    sockets in a directory both libvirtds see."""

    relay: str = ""
    certificate: str = ""
    libvirt: str = ""
    sockets: Path | None = None

    @staticmethod
    def of(node: Body) -> "Endpoint | None":
        text = ((node.get("metadata") or {}).get("annotations") or {}).get(MIGRATION_ENDPOINT_ANNOTATION)
        try:
            data = json.loads(text) if text else None
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        if data.get("relay") and data.get("certificate"):
            return Endpoint(relay=str(data["relay"]), certificate=str(data["certificate"]))
        if not data.get("libvirt") or not data.get("sockets"):
            return None
        sockets = Path(str(data["sockets"]))
        if not sockets.is_absolute():
            return None
        return Endpoint(libvirt=str(data["libvirt"]), sockets=sockets)

    def annotation(self) -> str:
        if self.relay:
            return json.dumps({"relay": self.relay, "certificate": self.certificate}, sort_keys=True)
        return json.dumps({"libvirt": self.libvirt, "sockets": str(self.sockets)}, sort_keys=True)


@dataclass(frozen=True)
class Tuning:
    limits: Limits = field(default_factory=Limits)
    bandwidth_mib: int = 0
    auto_converge: bool = False


class NodeMigrations:
    def __init__(
        self,
        node: str,
        kube: Kube,
        hypervisor: Hypervisor,
        reconciler: Reconciler,
        sync: VmSync,
        cache: VmCache,
        marks: MigrationMarks,
        migrations: StatusWriter[VmMigrationStatus],
        vms: StatusWriter[VirtualMachineStatus],
        events: EventRecorder,
        poke: Poke,
        tuning: Tuning | None = None,
        clock: Callable[[], float] = time.monotonic,
        relay: Relay | None = None,
    ) -> None:
        self.node = node
        self.relay = relay
        self.kube = kube
        self.hypervisor = hypervisor
        self.reconciler = reconciler
        self.sync = sync
        self.cache = cache
        self.marks = marks
        self.migrations = migrations
        self.vms = vms
        self.events = events
        self.poke = poke
        self.tuning = tuning or Tuning()
        self.clock = clock
        self._lock = threading.Lock()
        self._busy: set[str] = set()  # migration uids with a job in a worker now
        self._cancelled: set[str] = set()  # migration uids deleted while their copy runs
        self._waiting: dict[str, Body] = {}  # targets waiting for a base: uid -> body
        self._again: dict[str, tuple[Callable[..., None], tuple[Any, ...]]] = {}  # asked while busy
        self._workers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="migration")

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)

    # --- what the watch says -----------------------------------------------------------------

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

    def _submit(self, uid: str, job: Callable[..., None], *args: Any) -> None:
        """Run ``job`` for migration ``uid`` in a worker; one job per migration at a time. A job
        asked for meanwhile runs after it (the latest asked: each reads the object afresh),
        so an end that arrives while the target still prepares still cleans up after it."""
        with self._lock:
            if uid in self._busy:
                self._again[uid] = (job, args)
                return
            self._busy.add(uid)

        def run() -> None:
            try:
                job(*args)
            except Exception:
                log.exception("migration %s: %s failed", uid, job.__name__)
            finally:
                with self._lock:
                    self._busy.discard(uid)
                    self._cancelled.discard(uid)
                    follow = self._again.pop(uid, None)
                if follow is not None:
                    self._submit(uid, follow[0], *follow[1])

        self._workers.submit(run)

    # --- the target ----------------------------------------------------------------------------

    def _fresh(self, body: Body, phase: str, role: str) -> Body | None:
        """The VmMigration as it is now, if it still asks this node for ``phase``'s work (an
        event may be older than our own last write)."""
        meta = body["metadata"]
        fresh = self.kube.get_or_none(MIGRATION_PLURAL, meta["namespace"], meta["name"])
        if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
            return None
        status = fresh.get("status") or {}
        if status.get("phase") != phase or status.get(role) != self.node or status.get("domainMoved"):
            return None
        return fresh

    def _prepare(self, body: Body) -> None:
        fresh = self._fresh(body, "Preparing", "targetNode")
        if fresh is None:
            return
        body = fresh
        mig = VmMigration.model_validate(body)
        namespace, uid = mig.metadata.namespace or "", mig.metadata.uid or ""
        vm_body = self.kube.get_or_none(VM_PLURAL, namespace, mig.spec.vm_name)
        if vm_body is None:
            self._fail(body, "VmNotFound", f"VM {mig.spec.vm_name} is gone")
            return
        vm = VirtualMachine.model_validate(vm_body)
        uuid = vm.status.domain_uuid
        if not uuid:
            self._fail(body, "NoDomain", f"VM {vm.metadata.name} has no domain on its node to move")
            return
        if mig.status.sealed_user_data is not None:
            # The VM's own copy is sealed for its node, the source: the controller sealed one
            # for this node in the migration (controller/sealer.py). The seed is built from it.
            status = vm.status.model_copy(update={"sealed_user_data": mig.status.sealed_user_data})
            vm = vm.model_copy(update={"status": status})
        self.marks.set(Mark(vm.metadata.uid or "", "in", uid, namespace, vm.metadata.name, mig.metadata.name))
        dom = domain_name(namespace, vm.metadata.name)
        try:
            with self.sync.locked(dom):
                current = self.hypervisor.describe(dom)
                if current is not None and current.actual.active:
                    raise MigrationError("TargetBusy", f"a domain named {dom} runs on {self.node} already")
                if current is not None:
                    self.hypervisor.undefine(dom)
                self.reconciler.prepare_incoming(vm, uuid)
                if self.relay is not None:
                    self.relay.incoming(uid)  # where the target QEMU's sockets go
        except InputNotReadyError as exc:
            log.info("migration %s/%s waits on the target: %s", namespace, mig.metadata.name, exc)
            with self._lock:
                self._waiting[uid] = body
            return
        except (MigrationError, HypervisorError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, MigrationError) else "TargetFailed"
            self._fail(body, reason, f"preparing node {self.node}: {exc}")
            return
        self.migrations.write(
            body,
            lambda _: VmMigrationStatus(phase="Migrating", message=f"node {self.node} is ready"),
            guard=lambda b: _phase(b) == "Preparing" and _target(b) == self.node,
        )

    def _abandon_incoming(self, body: Body, mark: Mark | None = None) -> None:
        """A migration to here that did not happen: its prepared domain and files go, unless the
        VM is bound here after all (then they are its own)."""
        uid = body["metadata"].get("uid", "")
        if self.relay is not None:
            self.relay.forget(uid)
        marks = self.marks.of_migration(uid, "in")
        for held in marks if mark is None else [mark]:
            vm_body = self.cache.get(domain_name(held.namespace, held.vm_name))
            if vm_body is not None and vm_body["metadata"].get("uid") == held.vm_uid:
                self.marks.clear(held.vm_uid, uid)  # it arrived: its sync owns it now
                continue
            try:
                self._remove_prepared(held)
            except HypervisorError as exc:
                # libvirtd is away (it may have died mid-copy): looked at again until it is back.
                log.warning(
                    "cannot remove what was prepared for %s/%s yet: %s", held.namespace, held.vm_name, exc
                )
                if mark is None:
                    with self._lock:
                        self._waiting[uid] = body
                return
            self.marks.clear(held.vm_uid, uid)

    def _remove_prepared(self, mark: Mark) -> None:
        for info in self.hypervisor.owned_domains():
            owner = info.owner
            if owner is None or owner.uid != mark.vm_uid:
                continue
            with self.sync.locked(info.name):
                if info.actual.active:
                    # A guest runs here for a VM bound elsewhere: never removed by a guess.
                    log.warning("domain %s runs here though its migration did not end here", info.name)
                    return
                self.hypervisor.undefine(info.name)
                ghost = VirtualMachine.model_validate(
                    {"metadata": {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid}}
                )
                self.reconciler.remove_files(ghost)
            log.info("removed what node %s prepared for %s/%s", self.node, owner.namespace, owner.name)

    def _arrived(self, body: Body) -> None:
        uid = body["metadata"].get("uid", "")
        if self.relay is not None:
            self.relay.forget(uid)
        for mark in self.marks.of_migration(uid):
            self.marks.clear(mark.vm_uid, uid)
            self.poke(domain_name(mark.namespace, mark.vm_name))

    # --- the source ----------------------------------------------------------------------------

    def _move(self, body: Body) -> None:
        fresh = self._fresh(body, "Migrating", "sourceNode")
        if fresh is None:
            return
        body = fresh
        mig = VmMigration.model_validate(body)
        namespace, uid = mig.metadata.namespace or "", mig.metadata.uid or ""
        dom = domain_name(namespace, mig.spec.vm_name)
        vm_body = self.cache.get(dom)
        if vm_body is None:
            self._fail(body, "NotHere", f"VM {mig.spec.vm_name} is not bound to node {self.node}")
            return
        vm = VirtualMachine.model_validate(vm_body)
        vm_uid = vm.metadata.uid or ""
        target = mig.status.target_node or ""
        try:
            endpoint = Endpoint.of(self.kube.node(target))
        except NotFoundError:
            endpoint = None
        if endpoint is None:
            self._fail(body, "TargetUnreachable", f"node {target} publishes no migration endpoint")
            return
        earlier = self.marks.get(vm_uid)
        self.marks.set(Mark(vm_uid, "out", uid, namespace, vm.metadata.name, mig.metadata.name))
        try:
            with self._route(endpoint, namespace, mig.metadata.name, uid) as route, self.sync.locked(dom):
                info = self.hypervisor.describe(dom)
                if info is None or not info.actual.active:
                    uuid = vm.status.domain_uuid or ""
                    if (
                        earlier is not None
                        and earlier.migration_uid == uid
                        and uuid
                        and (libvirt_migration.runs_on(route.agent_uri, dom, uuid))
                    ):
                        # This agent died after the copy and before saying so: say it now.
                        self._moved(body, vm, None)
                        return
                    raise MigrationError("NotRunning", f"VM {vm.metadata.name} is not running on {self.node}")
                if earlier is not None and earlier.migration_uid == uid:
                    # This agent died mid-copy. Whether libvirt ended that copy with our
                    # connection or not, it is ended now: nobody follows it any more, and the
                    # target's overlays hold part of one. The user asks again.
                    if libvirt_migration.migrating(self.hypervisor, dom):
                        libvirt_migration.abort(self.hypervisor, dom)
                    raise MigrationError(
                        "SourceRestarted", f"the agent on {self.node} restarted during the copy"
                    )
                self.vms.write(vm_body, lambda _: VirtualMachineStatus(phase="Migrating"))
                job = self._copy(body, vm, dom, route, uid)
        except (MigrationError, HypervisorError, OSError, RelayError) as exc:
            reason = exc.reason if isinstance(exc, MigrationError) else "MigrationFailed"
            self._fail(body, reason, str(exc))
            self.marks.clear(vm_uid, uid)
            self.poke(dom)
            return
        self._moved(body, vm, job)

    @contextlib.contextmanager
    def _route(self, endpoint: Endpoint, namespace: str, migration: str, uid: str) -> Iterator[Route]:
        """The way to the target for this migration: a relay session, or straight there."""
        if not endpoint.relay:
            short = uid.replace("-", "")[:12]
            sockets = endpoint.sockets or Path("/")
            yield Route(
                libvirtd_uri=endpoint.libvirt,
                agent_uri=endpoint.libvirt,
                memory_uri=f"unix://{sockets / f'{short}-m.sock'}",
                disks_uri=f"unix://{sockets / f'{short}-d.sock'}",
            )
            return
        if self.relay is None:
            raise MigrationError(
                "NoRelay", f"node {self.node} has no migration relay to reach the target with"
            )
        with self.relay.outgoing(
            Stream(namespace, migration, uid, ""), endpoint.relay, endpoint.certificate
        ) as route:
            yield route

    def _copy(self, body: Body, vm: VirtualMachine, dom: str, route: Route, uid: str) -> dict[str, int]:
        """Run libvirt's migration in a thread and follow it; returns the finished job's figures
        as the target reports them. Raises MigrationError when it is cancelled, overdue or fails."""
        xml = libvirt_migration.target_definition(route.agent_uri, dom)
        disks = libvirt_migration.writable_disks(self.hypervisor.domain_xml(dom))
        short = uid.replace("-", "")[:12]
        failure: list[Exception] = []

        def run() -> None:
            try:
                libvirt_migration.migrate(
                    self.hypervisor,
                    dom,
                    route.libvirtd_uri,
                    xml,
                    route.memory_uri,
                    route.disks_uri,
                    disks,
                    bandwidth_mib=self.tuning.bandwidth_mib,
                    auto_converge=self.tuning.auto_converge,
                )
            except Exception as exc:  # carried to the thread that follows the copy
                failure.append(exc)

        mover = threading.Thread(target=run, name=f"migrate-{short}", daemon=True)
        began = self.clock()
        mover.start()
        stop = self._follow(mover, body, vm, dom, uid)
        log.info("%s: the copy to %s ended after %.2fs", dom, route.libvirtd_uri, self.clock() - began)
        if failure:
            if stop is not None:
                raise stop
            raise MigrationError("MigrationFailed", str(failure[0]))
        try:
            return libvirt_migration.completed_job_on(route.agent_uri, dom)
        except HypervisorError as exc:
            log.warning("the figures of %s's migration: %s", dom, exc)
            return {}

    def _follow(
        self, mover: threading.Thread, body: Body, vm: VirtualMachine, dom: str, uid: str
    ) -> "MigrationError | None":
        """Watch the copy until it ends: its progress written every few seconds, and cancelled
        (libvirt's abortJob) when its VmMigration is deleted or it runs past its limits; returns
        why it was cancelled, or None."""
        limits = self.tuning.limits
        completion = completion_timeout(limits, vm.spec.memory_bytes, vm.spec.disk_bytes)
        start = self.clock()
        watch = ProgressWatch(start, start)
        stop: MigrationError | None = None
        written = 0.0
        while mover.is_alive():
            mover.join(POLL_SECONDS)
            if not mover.is_alive() or stop is not None:
                continue
            with self._lock:
                cancelled = uid in self._cancelled
            at = self.clock()
            if cancelled:
                stop = MigrationError("Cancelled", "the VmMigration was deleted")
            else:
                try:
                    stats = libvirt_migration.progress(self.hypervisor, dom)
                except HypervisorError:
                    stats = {}
                if stats:
                    watch.observe(at, stats.get("memory_remaining", 0) + stats.get("disk_remaining", 0))
                    if at - written >= PROGRESS_WRITE_SECONDS:
                        written = at
                        self._write_progress(body, stats)
                why = watch.overdue(at, limits, completion)
                stop = MigrationError("Timeout", why) if why is not None else None
            if stop is not None:
                try:
                    libvirt_migration.abort(self.hypervisor, dom)
                except HypervisorError as exc:
                    log.warning("cancelling the migration of %s: %s", dom, exc)
        return stop

    def _write_progress(self, body: Body, stats: dict[str, int]) -> None:
        memory_total, memory_left = stats.get("memory_total", 0), stats.get("memory_remaining", 0)
        disk_total, disk_left = stats.get("disk_total", 0), stats.get("disk_remaining", 0)
        progress = MigrationProgress(
            summary=progress_summary(memory_left, memory_total, disk_left),
            memory_total=memory_total,
            memory_remaining=memory_left,
            disk_total=disk_total,
            disk_remaining=disk_left,
            bandwidth=stats.get("memory_bps", 0),
        )
        self.migrations.write(
            body,
            lambda _: VmMigrationStatus(progress=progress),
            guard=lambda b: _phase(b) == "Migrating" and not (b.get("status") or {}).get("domainMoved"),
        )

    def _moved(self, body: Body, vm: VirtualMachine, job: dict[str, int] | None) -> None:
        """The guest runs on the target: the VM's files here go, then the controller is told
        (it moves the binding)."""
        self.reconciler.remove_files(vm, release=True)
        fields = VmMigrationStatus(domain_moved=True, message=f"the guest runs on {_target(body)}")
        if job:
            fields.progress = MigrationProgress(
                summary="done",
                memory_total=job.get("memory_total"),
                memory_remaining=0,
                disk_total=job.get("disk_total"),
                disk_remaining=0,
                bandwidth=job.get("memory_bps"),
                downtime_milliseconds=job.get("downtime"),
            )
        self.migrations.write(body, lambda _: fields)
        metrics.MIGRATIONS.labels("moved").inc()
        downtime = f", paused {job['downtime']} ms" if job and "downtime" in job else ""
        self.events.post(
            body, MIGRATION_KIND, "Moved", f"VM {vm.metadata.name} runs on {_target(body)}{downtime}"
        )

    def _settle_outgoing(self, body: Body, mark: Mark | None = None) -> None:
        """A migration out of here ended (or its object is gone): the VM is the sync's again if
        it is still here; its mark goes."""
        uid = body["metadata"].get("uid", "")
        marks = self.marks.of_migration(uid, "out")
        for held in marks if mark is None else [mark]:
            self.marks.clear(held.vm_uid, uid)
            self.poke(domain_name(held.namespace, held.vm_name))

    # --- shared ---------------------------------------------------------------------------------

    def _fail(self, body: Body, reason: str, message: str) -> None:
        meta = body["metadata"]
        log.warning("migration %s/%s failed: %s", meta.get("namespace"), meta.get("name"), message)
        metrics.MIGRATIONS.labels("failed").inc()
        phase = "Cancelled" if reason == "Cancelled" else "Failed"
        written = self.migrations.write(
            body,
            lambda _: VmMigrationStatus(phase=phase, reason=reason, message=message, end_time=now()),
            guard=lambda b: (
                _phase(b) not in ("Succeeded", "Failed", "Cancelled")
                and not (b.get("status") or {}).get("domainMoved")
            ),
        )
        if written is not None:
            self.events.post(body, MIGRATION_KIND, reason, message, "Warning")


def _phase(body: Body) -> str | None:
    return (body.get("status") or {}).get("phase")


def _target(body: Body) -> str:
    return str((body.get("status") or {}).get("targetNode") or "")
