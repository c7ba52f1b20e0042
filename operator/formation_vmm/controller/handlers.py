"""kopf handlers of the controller. The controller only watches (kopf ``on.event``: no
finalizers, no annotations written on VMs; the VMs themselves come down a watch of our own,
vm_watch.py) and hands what it sees to the Binder and its helpers.
Every replica watches (so a standby has warm caches); only the leader writes."""

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from formation_vmm.api.models import VmImageStatus, VmNetworkStatus
from formation_vmm.api.names import (
    GROUP,
    HYPERVISOR_LABEL,
    IMAGE_PLURAL,
    MIGRATION_PLURAL,
    NETWORK_PLURAL,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VERSION,
    VM_PLURAL,
)
from formation_vmm.config import Settings
from formation_vmm.controller.binder import Binder
from formation_vmm.controller.drain import Drainer
from formation_vmm.controller.image_guard import ImageGuard
from formation_vmm.controller.leader import LeaderElector
from formation_vmm.controller.lost_nodes import LostNodes
from formation_vmm.controller.migrations import MigrationScheduler
from formation_vmm.controller.node_entries import forget_node_images, forget_node_networks
from formation_vmm.controller.nodes import node_summary
from formation_vmm.controller.sealer import Sealer
from formation_vmm.controller.snapshot_notes import SnapshotNotes
from formation_vmm.health import Health
from formation_vmm.kopf_settings import watch_only
from formation_vmm.kube import Kube, StatusWriter
from formation_vmm.vm_watch import VmWatch

log = logging.getLogger(__name__)

# A pending VM is tried again at least this often, even when nothing announced new capacity
# (a heartbeat that turned fresh is not a watch event the binder reacts to by itself).
RETRY_SECONDS = 5.0


@dataclass
class ControllerMemo:
    settings: Settings
    kube: Kube
    binder: Binder
    migrations: MigrationScheduler
    drainer: Drainer
    network_status: StatusWriter[VmNetworkStatus]
    image_status: StatusWriter[VmImageStatus]
    lost_nodes: LostNodes
    guard: ImageGuard
    notes: SnapshotNotes
    leader: LeaderElector
    sealer: Sealer
    health: Health
    vm_watch: VmWatch  # every VM, into the binder, the sealer and the image guard (vm_feed.py)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def controller_memo(memo: kopf.Memo) -> ControllerMemo:
    return cast(ControllerMemo, memo.state)


def _forget_node(state: ControllerMemo, node: str) -> None:
    """A deleted Node's entries leave the networks' and images' status (node_entries.py)."""
    forget_node_networks(state.network_status, state.kube.list(NETWORK_PLURAL), node)
    forget_node_images(state.image_status, state.kube.list(IMAGE_PLURAL), node)


async def _bind_loop(state: ControllerMemo) -> None:
    binder, guard = state.binder, state.guard
    while True:
        await asyncio.to_thread(binder.changed.wait, RETRY_SECONDS)
        binder.changed.clear()
        state.health.beat("loop")
        if not state.leader.is_leader():
            continue
        try:
            if not binder.seeded:  # every VM's binding and addresses, before binding any
                binder.seed(await asyncio.to_thread(state.kube.list, VM_PLURAL))
            await asyncio.to_thread(binder.bind_pending)
            await asyncio.to_thread(binder.admit_changes)
            await asyncio.to_thread(binder.mark_lost_nodes)
            await asyncio.to_thread(state.migrations.pass_once)
            await asyncio.to_thread(state.drainer.pass_once)
            await asyncio.to_thread(state.lost_nodes.pass_once)
            await asyncio.to_thread(state.sealer.pass_once)
            for image in guard.pending():  # deleted images held for their VMs: look again
                await asyncio.to_thread(guard.release_if_unused, image)
        except Exception:  # the loop must outlive any one failure
            log.exception("binding pass failed")


async def _lead(state: ControllerMemo) -> None:
    leader = state.leader
    while True:
        try:
            leading = await asyncio.to_thread(leader.step)
            state.health.beat("api")
            if leading:
                state.binder.changed.set()  # a new leader binds what waited at once
        except Exception:
            log.exception("leader election failed")
        await asyncio.sleep(leader.renew)


def register(registry: kopf.OperatorRegistry, lease_namespace: str, lease_name: str) -> None:
    _register_networks(registry)
    _register_requests(registry)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.watching.label_selectors["nodes"] = f"{HYPERVISOR_LABEL}=true"
        settings.watching.field_selectors["coordination.k8s.io", "leases"] = f"metadata.name={lease_name}"
        watch_only(settings)
        state = controller_memo(memo)
        state.vm_watch.start()
        state.tasks = [
            asyncio.create_task(_lead(state), name="leader"),
            asyncio.create_task(_bind_loop(state), name="bind"),
        ]

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        state = controller_memo(memo)
        for task in state.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.vm_watch.stop()

    @kopf.on.event(
        "coordination.k8s.io",
        "v1",
        "leases",
        id="lease",
        registry=registry,
        when=_in_namespace(lease_namespace),
    )
    async def lease(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        """The lease watch shows a renewal: proof that our watches deliver (the leader sees its
        own; a standby, the leader's)."""
        state = controller_memo(memo)
        renewed = (event["object"].get("spec") or {}).get("renewTime")
        if renewed and (not state.leader.is_leader() or renewed == state.leader.last_written):
            state.health.beat("watch")

    # Async on purpose: these only update the binder's memory (a thread hop per watch event
    # would cost more than the work); the rare API write goes to a thread.
    @kopf.on.event("", "v1", "nodes", labels={HYPERVISOR_LABEL: "true"}, id="nodes", registry=registry)
    async def nodes(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        state = controller_memo(memo)
        summary = node_summary(dict(event["object"]))
        state.binder.node_event(event.get("type"), summary)
        state.sealer.node_event(event.get("type"), summary)
        if event.get("type") == "DELETED" and state.leader.is_leader():
            await asyncio.to_thread(_forget_node, state, summary["name"])

    @kopf.on.event("", "v1", "resourcequotas", id="quotas", registry=registry)
    async def quotas(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        """A namespace's VM quota (quota.py): the binder counts against it."""
        controller_memo(memo).binder.quota_event(event.get("type"), dict(event["object"]))

    # The VMs come down a watch of our own (vm_watch.py, controller/vm_feed.py), not kopf's.

    @kopf.on.event(GROUP, VERSION, IMAGE_PLURAL, id="images", registry=registry)
    def images(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        state = controller_memo(memo)
        body = dict(event["object"])
        state.sealer.image_event(event.get("type"), body)
        state.guard.image_event(event.get("type"), body, write=state.leader.is_leader())

    @kopf.on.event(GROUP, VERSION, SNAPSHOT_PLURAL, id="snapshots", registry=registry)
    def snapshots(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        state = controller_memo(memo)
        state.binder.snapshot_event(event.get("type"), dict(event["object"]))
        if event.get("type") != "DELETED" and state.leader.is_leader():
            state.notes.event(SNAPSHOT_KIND, dict(event["object"]))


def _register_requests(registry: kopf.OperatorRegistry) -> None:
    """What users ask of a VM through objects of their own: snapshots, restores, migrations."""

    @kopf.on.event(GROUP, VERSION, MIGRATION_PLURAL, id="migrations", registry=registry)
    async def migrations(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        state = controller_memo(memo)
        state.sealer.migration_event(event.get("type"), dict(event["object"]))
        body = state.migrations.event(event.get("type"), dict(event["object"]))
        if body is not None and state.leader.is_leader():
            await asyncio.to_thread(state.migrations.act, body)

    @kopf.on.event(GROUP, VERSION, RESTORE_PLURAL, id="restores", registry=registry)
    def restores(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        state = controller_memo(memo)
        if event.get("type") != "DELETED" and state.leader.is_leader():
            state.notes.event(RESTORE_KIND, dict(event["object"]))


def _register_networks(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.event(GROUP, VERSION, NETWORK_PLURAL, id="networks", registry=registry)
    async def networks(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        """Which VmNetworks exist (the binder refuses others, and assigns from their ranges)."""
        controller_memo(memo).binder.network_event(event.get("type"), dict(event["object"]))

    @kopf.on.event("", "v1", "namespaces", id="namespaces", registry=registry)
    async def namespaces(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        """Namespaces' labels: a VmNetwork's namespaceSelector matches them."""
        controller_memo(memo).binder.namespace_event(event.get("type"), dict(event["object"]))


def _in_namespace(namespace: str) -> Any:
    def check(body: kopf.Body, **_: Any) -> bool:
        return bool(body.get("metadata", {}).get("namespace") == namespace)

    return check
