"""The controller's process: kopf runs it (startup, login, cleanup), our informers watch every
kind (informer.py; the VMs through vm_feed.py) and hand what they see to the Binder and its
helpers, and two loops lead and bind. Every replica watches (so a standby has warm caches);
only the leader writes."""

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, cast

import kopf

from formation_vmm.api.models import VmImageStatus, VmNetworkStatus
from formation_vmm.api.names import (
    IMAGE_PLURAL,
    NETWORK_PLURAL,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VM_PLURAL,
)
from formation_vmm.config import Settings
from formation_vmm.controller.binding.binder import Binder
from formation_vmm.controller.binding.nodes import node_summary
from formation_vmm.controller.image_guard import ImageGuard
from formation_vmm.controller.leader import LeaderElector
from formation_vmm.controller.moves.drain import Drainer
from formation_vmm.controller.moves.lost_nodes import LostNodes
from formation_vmm.controller.moves.migrations import MigrationScheduler
from formation_vmm.controller.node_entries import forget_node_images, forget_node_networks
from formation_vmm.controller.sealer import Sealer, Seen
from formation_vmm.controller.snapshot_notes import SnapshotNotes
from formation_vmm.health import Health
from formation_vmm.informer import Changed, Handler, Informer
from formation_vmm.kube import Body, Kube, Resource, StatusWriter

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
    vm_watch: Informer  # every VM, into the binder, the sealer and the image guard (vm_feed.py)
    informers: list[Informer] = field(default_factory=list)  # every other kind (informers())
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


def register(registry: kopf.OperatorRegistry) -> None:
    """kopf runs the process (startup, login, cleanup); every watch is an Informer of ours."""

    @kopf.on.startup(registry=registry)
    async def configure(memo: kopf.Memo, **_: Any) -> None:
        state = controller_memo(memo)
        for informer in [state.vm_watch, *state.informers]:
            informer.start()
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
        for informer in [state.vm_watch, *state.informers]:
            informer.stop()


def informers(state: ControllerMemo, lease_namespace: str, lease_name: str, seen: Seen) -> list[Informer]:
    """The controller's watches of everything but VMs (vm_feed.py has those), each handler in
    its informer's thread; ``seen``'s, whose stores the sealer and the image guard read, are
    wired here. Every replica watches (so a standby has warm caches); only the leader writes."""
    kube = state.kube
    sealer = state.sealer

    def wired(informer: Informer, handler: Handler, changed: Changed) -> Informer:
        informer.handler, informer.changed = handler, changed
        return informer

    return [
        Informer(
            kube,
            Resource("leases", "coordination.k8s.io", "v1", namespace=lease_namespace),
            lambda kind, body: _lease(state, body),
            field_selector=f"metadata.name={lease_name}",
        ),
        wired(seen.nodes, lambda kind, body: _node(state, kind, body), sealer.node_changed),
        Informer(kube, Resource("resourcequotas", "", "v1"), state.binder.quota_event),
        wired(seen.images, lambda kind, body: _image(state, kind, body), sealer.image_changed),
        Informer(kube, Resource(SNAPSHOT_PLURAL), lambda kind, body: _snapshot(state, kind, body)),
        wired(seen.migrations, lambda kind, body: _migration(state, kind, body), sealer.migration_changed),
        Informer(kube, Resource(RESTORE_PLURAL), lambda kind, body: _restore(state, kind, body)),
        # Which VmNetworks exist (the binder refuses others, and assigns from their ranges), and
        # the namespaces' labels their namespaceSelectors match.
        Informer(kube, Resource(NETWORK_PLURAL), state.binder.network_event),
        Informer(kube, Resource("namespaces", "", "v1"), state.binder.namespace_event),
    ]


def _lease(state: ControllerMemo, body: Body) -> None:
    """The lease watch shows a renewal: proof that our watches deliver (the leader sees its own;
    a standby, the leader's)."""
    renewed = (body.get("spec") or {}).get("renewTime")
    if renewed and (not state.leader.is_leader() or renewed == state.leader.last_written):
        state.health.beat("watch")


def _node(state: ControllerMemo, kind: str | None, body: Body) -> None:
    summary = node_summary(body)
    state.binder.node_event(kind, summary)
    if kind == "DELETED" and state.leader.is_leader():
        _forget_node(state, summary["name"])


def _image(state: ControllerMemo, kind: str | None, body: Body) -> None:
    state.guard.image_event(kind, body, write=state.leader.is_leader())


def _snapshot(state: ControllerMemo, kind: str | None, body: Body) -> None:
    state.binder.snapshot_event(kind, body)
    if kind != "DELETED" and state.leader.is_leader():
        state.notes.event(SNAPSHOT_KIND, body)


def _migration(state: ControllerMemo, kind: str | None, body: Body) -> None:
    """What users ask of a VM through objects of their own: migrations, snapshots, restores."""
    acted = state.migrations.event(kind, body)
    if acted is not None and state.leader.is_leader():
        state.migrations.act(acted)


def _restore(state: ControllerMemo, kind: str | None, body: Body) -> None:
    if kind != "DELETED" and state.leader.is_leader():
        state.notes.event(RESTORE_KIND, body)
