"""This node as a migration's source (docs/migration.md): libvirt copies the running guest to
the target (through the relay, or straight there on one machine), this agent follows the copy,
writes its progress, cancels it when told or when it runs too long, and removes the VM's files
once the guest runs on the target."""

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import HypervisorError
from formation_vmm.agent.hypervisor import migration as libvirt_migration
from formation_vmm.agent.migration.migration_work import (
    POLL_SECONDS,
    PROGRESS_WRITE_SECONDS,
    Body,
    Endpoint,
    MigrationError,
    MigrationWork,
    phase_of,
    target_of,
)
from formation_vmm.agent.migration.relay import RelayError, Route, Stream
from formation_vmm.agent.vms.migration_marks import Mark
from formation_vmm.api.models import (
    MigrationProgress,
    VirtualMachine,
    VirtualMachineStatus,
    VmMigration,
    VmMigrationStatus,
)
from formation_vmm.api.names import MIGRATION_KIND
from formation_vmm.domain.naming import domain_name
from formation_vmm.kube import NotFoundError
from formation_vmm.migration_rules import ProgressWatch, completion_timeout, progress_summary

log = logging.getLogger(__name__)


class OutgoingMigrations(MigrationWork):
    def _move(self, body: Body) -> None:
        fresh = self._fresh(body, "Migrating", "sourceNode")
        if fresh is None:
            return
        body = fresh
        mig = VmMigration.model_validate(body)
        namespace, uid = mig.metadata.namespace or "", mig.metadata.uid or ""
        dom = domain_name(namespace, mig.spec.vm_name)
        vm_body = self._bound_here(namespace, mig.spec.vm_name)
        if vm_body is None:
            self._fail(body, "NotHere", f"VM {mig.spec.vm_name} is not bound to node {self.node}")
            return
        vm = VirtualMachine.model_validate(vm_body)
        vm_uid = vm.metadata.uid or ""
        target = mig.status.target_node or ""
        try:
            endpoint = Endpoint.of(self.kube.node(target), allow_direct=self.tuning.direct)
        except NotFoundError:
            endpoint = None
        if endpoint is None:
            self._fail(body, "TargetUnreachable", f"node {target} publishes no migration endpoint")
            return
        earlier = self.marks.get(vm_uid)
        self.marks.set(Mark(vm_uid, "out", uid, namespace, vm.metadata.name, mig.metadata.name))
        try:
            with (
                self._route(
                    endpoint, namespace, mig.metadata.name, uid, self.reconciler.qemu_owner(vm)
                ) as route,
                self.sync.locked(dom),
            ):
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
    def _route(
        self, endpoint: Endpoint, namespace: str, migration: str, uid: str, owner: tuple[int, int] | None
    ) -> Iterator[Route]:
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
            Stream(namespace, migration, uid, ""), endpoint.relay, endpoint.certificate, owner
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
        stop = self._follow(mover, body, vm, dom)
        log.info("%s: the copy to %s ended after %.2fs", dom, route.libvirtd_uri, self.clock() - began)
        if failure:
            if stop is not None:
                raise stop
            raise MigrationError("MigrationFailed", str(failure[0]))
        try:
            job = libvirt_migration.completed_job_on(route.agent_uri, dom)
        except HypervisorError as exc:
            log.warning("the figures of %s's migration: %s", dom, exc)
            return {}
        # libvirt's own account beside ours: what the wait above adds to its job is setup
        # (the connection to the target, the target's QEMU starting) and the end.
        log.info(
            "%s: libvirt's job took %.2fs (downtime %d ms, %d MiB of memory sent), read %.2fs after it began",
            dom,
            job.get("time_elapsed", 0) / 1000,
            job.get("downtime", 0),
            job.get("memory_processed", 0) >> 20,
            self.clock() - began,
        )
        return job

    def _follow(
        self, mover: threading.Thread, body: Body, vm: VirtualMachine, dom: str
    ) -> "MigrationError | None":
        """Watch the copy until it ends: its progress written every few seconds, and cancelled
        (libvirt's abortJob) when its VmMigration is deleted or ended (as the informer's store
        shows it) or it runs past its limits; returns
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
            ended = self._ended(body)
            at = self.clock()
            if ended is not None:
                stop = MigrationError("Cancelled", ended)
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
            guard=lambda b: phase_of(b) == "Migrating" and not (b.get("status") or {}).get("domainMoved"),
        )

    def _moved(self, body: Body, vm: VirtualMachine, job: dict[str, int] | None) -> None:
        """The guest runs on the target: the VM's files here go, then the controller is told
        (it moves the binding)."""
        self.reconciler.remove_files(vm, release=True)
        fields = VmMigrationStatus(domain_moved=True, message=f"the guest runs on {target_of(body)}")
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
            body, MIGRATION_KIND, "Moved", f"VM {vm.metadata.name} runs on {target_of(body)}{downtime}"
        )

    def _settle_outgoing(self, body: Body, mark: Mark | None = None) -> None:
        """A migration out of here ended (or its object is gone): the VM is the sync's again if
        it is still here; its mark goes."""
        uid = body["metadata"].get("uid", "")
        marks = self.marks.of_migration(uid, "out")
        for held in marks if mark is None else [mark]:
            self.marks.clear(held.vm_uid, uid)
            self.poke(domain_name(held.namespace, held.vm_name))
