"""The agent's process: kopf runs it (startup, login, cleanup), our informers watch every kind
(informer.py), one work queue (workqueue.py) does the work of VMs, snapshots, restores and
migrations, and background loops beat, resync and collect. Thin: a watch event updates a store
and queues a key; the queue's workers and the components built in ``run.py`` do the rest."""

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import kopf

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.migration.migrations import Endpoint, NodeMigrations
from formation_vmm.agent.migration.relay import Identity, Relay
from formation_vmm.agent.networks.node_guard import NodeGuard
from formation_vmm.agent.networks.node_networks import NodeNetworks
from formation_vmm.agent.snapshots.node_snapshots import Snapshots
from formation_vmm.agent.vms.inputs import ImageCatalog
from formation_vmm.agent.vms.vm_controller import VmCache, VmController
from formation_vmm.api.conditions import now
from formation_vmm.api.models import VmImage
from formation_vmm.api.names import (
    AGENT_ACCESS_ANNOTATION,
    AGENT_KEY_ANNOTATION,
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_DISK_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    GROUP,
    HEARTBEAT_ANNOTATION,
    MIGRATION_ENDPOINT_ANNOTATION,
    MIGRATION_KIND,
    NETWORK_PLURAL,
    RESTORE_KIND,
    SNAPSHOT_KIND,
    VM_COUNT_ANNOTATION,
    VM_KIND,
)
from formation_vmm.api.quantity import format_mebibytes
from formation_vmm.config import Settings
from formation_vmm.domain.naming import domain_name
from formation_vmm.health import Health
from formation_vmm.images.collector import GarbageCollector
from formation_vmm.images.node import NodeImages
from formation_vmm.informer import Handler, Informer, key_of
from formation_vmm.kube import Body, Kube, Resource
from formation_vmm.sealing import NodeKey
from formation_vmm.workqueue import Lane, WorkQueue

log = logging.getLogger(__name__)

# How long the first syncs wait for the VmSnapshots' first list.
SNAPSHOTS_LISTED_SECONDS = 10.0
# Workers of the queue's lanes besides the VMs' (settings.sync_workers): a migration's copy
# holds one for its whole length; snapshots and restores take the VM's domain lock.
MIGRATION_WORKERS = 4
SNAPSHOT_WORKERS = 2
RESTORE_WORKERS = 1


@dataclass
class AgentMemo:
    """Everything the agent's handlers and loops use, built once in ``run.py``."""

    settings: Settings
    node: str
    access: str | None  # the Node annotation: how the controller reaches us (None: it does not)
    kube: Kube
    hypervisor: Hypervisor
    queue: WorkQueue
    vms: Lane  # the VMs' keys (domain names) in the queue
    cache: VmCache
    vm_controller: VmController
    images: ImageCatalog  # a view of the images' informer store
    node_images: NodeImages
    collector: GarbageCollector
    snapshots: Snapshots
    migrations: NodeMigrations
    networks: NodeNetworks
    health: Health
    key: NodeKey
    vm_watch: Informer  # this node's VMs, into the cache and the queue
    snapshots_seen: Informer | None = None  # the VmSnapshots' informer (its store counts them)
    informers: list[Informer] = field(default_factory=list)  # every other kind (informers())

    migration_endpoint: str | None = None  # the Node annotation: how other nodes' agents reach us
    relay: Relay | None = None
    guard: NodeGuard | None = None  # guests kept off the node's ports (real QEMU only)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # The heartbeat last written to the Node, until the Node's watch shows it back.
    sent_beat: str = ""
    # The host's (CPUs, memory) as libvirt last told: the heartbeat goes on while libvirtd
    # does not answer (the node and its guests are there; libvirt's state shows on the VMs).
    capacity: tuple[int, int, int] | None = None  # vCPUs, memory, disk bytes


def agent_memo(memo: kopf.Memo) -> AgentMemo:
    return cast(AgentMemo, memo.state)


def disk_capacity(disks_dir: Path) -> int:
    """The size of the filesystem VM disks go to (placement counts their declared sizes)."""
    disks_dir.mkdir(parents=True, exist_ok=True)
    fs = os.statvfs(disks_dir)
    return fs.f_blocks * fs.f_frsize


def publish_node(state: AgentMemo) -> None:
    """Write this node's capacity (less the reserve), VM count, endpoints and a heartbeat."""
    if state.capacity is None:  # once: the host does not change under us
        state.capacity = (*state.hypervisor.capacity(), disk_capacity(state.settings.disks_dir))
    cpus, memory, disk = state.capacity
    settings = state.settings
    beat = now().strftime("%Y-%m-%dT%H:%M:%SZ")
    annotations = {
        CAPACITY_CPUS_ANNOTATION: str(max(cpus - settings.reserved_cpus, 0)),
        CAPACITY_MEMORY_ANNOTATION: format_mebibytes(max(memory - settings.reserved_memory, 0)),
        CAPACITY_DISK_ANNOTATION: format_mebibytes(disk),
        VM_COUNT_ANNOTATION: str(len(state.cache)),
        AGENT_ACCESS_ANNOTATION: state.access,
        f"{GROUP}/agent-endpoint": None,  # what agents before the aggregated API wrote
        AGENT_KEY_ANNOTATION: state.key.public_b64,
        HEARTBEAT_ANNOTATION: beat,
        MIGRATION_ENDPOINT_ANNOTATION: state.migration_endpoint,
    }
    state.kube.patch_node(state.node, {"metadata": {"annotations": annotations}})
    state.sent_beat = beat
    state.health.beat("api")
    metrics.HEARTBEATS.inc()


def access_annotation(settings: Settings, identity: Identity) -> str | None:
    """The node's access annotation: the TLS port the controller asks for consoles and
    counters, and the certificate the agent shows there; None when it serves none."""
    if not settings.access_port:
        return None
    return json.dumps({"port": settings.access_port, "certificate": identity.certificate})


def migration_endpoint(settings: Settings, relay: Relay | None) -> str | None:
    """The node's migration endpoint annotation; None (removed) when it takes no migrations."""
    if relay is not None:
        host = (settings.migration_relay_advertise or settings.migration_relay_listen or "").rpartition(":")[
            0
        ]
        return Endpoint(relay=f"{host}:{relay.port}", certificate=relay.identity.certificate).annotation()
    if not settings.migration_libvirt_uri or settings.migration_socket_dir is None:
        return None
    settings.migration_socket_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
    return Endpoint(
        libvirt=settings.migration_libvirt_uri, sockets=settings.migration_socket_dir.resolve()
    ).annotation()


def collect_images(state: AgentMemo) -> None:
    """One pass of the image cache's collector, against the VmImages of the informer's store
    (none before its first list: an empty store is not a cluster without images). A VmImage
    deleted while the watch was down leaves the store with the next list, as any deletion."""
    live = state.images.all()
    if live is not None:
        state.collector.collect(live)


def _snapshots_listed(state: AgentMemo) -> None:
    """Wait (a while) for the snapshots' first list before the first sync: a restarted agent
    would otherwise write LiveMigratable True, then False again."""
    seen = state.snapshots_seen
    if seen is not None and not seen.synced.wait(SNAPSHOTS_LISTED_SECONDS):
        log.warning("the VmSnapshots are not listed yet: the first syncs count none")


def vm_event(state: AgentMemo, event_type: str | None, body: Body) -> None:
    """A VM of this node's watch: into the cache and the queue; one new here brings the
    snapshots and restores that waited for it."""
    meta = body["metadata"]
    namespace, name = str(meta.get("namespace", "")), str(meta.get("name", ""))
    arrived = event_type != "DELETED" and state.cache.get(domain_name(namespace, name)) is None
    state.vm_controller.vm_event(event_type, body)
    if arrived:
        state.snapshots.vm_arrived(namespace, name)


def _snapshot_event(state: AgentMemo, body: Body) -> None:
    vm = domain_name(
        str(body["metadata"].get("namespace", "")), str((body.get("spec") or {}).get("vmName", ""))
    )
    if state.cache.get(vm) is not None:
        state.vms.add(vm)  # its LiveMigratable condition may change
    state.queue.add(SNAPSHOT_KIND, key_of(body))


async def _every(seconds: float, work: Callable[[], Any], what: str, first: bool = True) -> None:
    """Run ``work`` in a thread every ``seconds``; a failure is logged, never fatal."""
    if not first:
        await asyncio.sleep(seconds)
    while True:
        try:
            await asyncio.to_thread(work)
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(seconds)


def _task(coro: Awaitable[None], name: str) -> asyncio.Task[None]:
    return asyncio.create_task(coro, name=name)  # type: ignore[arg-type]


def _converge_networks(state: "AgentMemo") -> None:
    """The VmNetworks realised again, then the guard's rules (a new network's gateway)."""
    state.networks.converge()
    if state.guard is not None:
        state.guard.refresh()


def register(registry: kopf.OperatorRegistry) -> None:
    """kopf runs the process (startup, login, cleanup); every watch is an Informer of ours."""

    @kopf.on.startup(registry=registry)
    async def configure(memo: kopf.Memo, **_: Any) -> None:
        state = agent_memo(memo)
        config = state.settings
        for informer in state.informers:
            informer.start()
        await asyncio.to_thread(_snapshots_listed, state)
        queue = state.queue
        queue.start(VM_KIND, state.vm_controller.process, config.sync_workers)
        queue.start(MIGRATION_KIND, state.migrations.process, MIGRATION_WORKERS)
        queue.start(SNAPSHOT_KIND, state.snapshots.process_snapshot, SNAPSHOT_WORKERS)
        queue.start(RESTORE_KIND, state.snapshots.process_restore, RESTORE_WORKERS)
        for key in state.migrations.marked():  # one deleted while this agent was away ends here
            queue.add(MIGRATION_KIND, key)
        state.vm_watch.start()
        await asyncio.to_thread(publish_node, state)
        state.tasks = [
            _task(
                _every(config.heartbeat_seconds, lambda: publish_node(state), "heartbeat", False), "heartbeat"
            ),
            _task(_every(config.resync_seconds, state.vm_controller.resync, "resync", False), "resync"),
            _task(
                _every(config.resync_seconds, lambda: _converge_networks(state), "networks", False),
                "networks",
            ),
            _task(
                _every(config.image_gc_interval_seconds, lambda: collect_images(state), "image GC", False),
                "image-gc",
            ),
        ]

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        state = agent_memo(memo)
        for task in state.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for informer in [state.vm_watch, *state.informers]:
            informer.stop()
        state.queue.close()
        if state.relay is not None:
            state.relay.stop()
        state.node_images.close()
        state.hypervisor.close()


def informers(
    state: AgentMemo, images: Informer, snapshots: Informer, restores: Informer, migrations: Informer
) -> list[Informer]:
    """The agent's watches of everything but its VMs (``vm_watch``), each handler in its
    informer's thread. The agent decides from objects as they are: it writes nothing of kopf's
    kind on them (annotations, a finalizer of its own)."""
    kube = state.kube
    queue = state.queue

    def wired(informer: Informer, handler: Handler) -> Informer:
        informer.handler = handler
        return informer

    return [
        wired(images, lambda kind, body: _image_event(state, kind, body)),
        Informer(kube, Resource(NETWORK_PLURAL), lambda kind, body: _network_event(state, kind, body)),
        # Only this node's Node: the apiserver filters.
        Informer(
            kube,
            Resource("nodes", "", "v1"),
            lambda kind, body: _own_node(state, body),
            field_selector=f"metadata.name={state.node}",
        ),
        wired(snapshots, lambda kind, body: _snapshot_event(state, body)),
        wired(migrations, lambda kind, body: queue.add(MIGRATION_KIND, key_of(body))),
        wired(restores, lambda kind, body: queue.add(RESTORE_KIND, key_of(body))),
    ]


def _image_event(state: AgentMemo, kind: str | None, body: Body) -> None:
    image = VmImage.model_validate(body)
    if kind == "DELETED":
        return
    if image.spec.prefetch == "AllNodes" and not image.metadata.deletion_timestamp:
        state.node_images.prefetch(image)
    state.vm_controller.image_changed(image.metadata.namespace or "", image.metadata.name)


def _network_event(state: AgentMemo, kind: str | None, body: Body) -> None:
    """Realise the VmNetwork here (libvirt and a status write), then look again at the VMs that
    use it (those waiting for it start now)."""
    state.networks.event(kind, body)
    for key in state.cache.users_of_network(str(body["metadata"]["name"])):
        state.vms.add(key)


def _own_node(state: AgentMemo, body: Body) -> None:
    """The Node watch shows our last heartbeat back: proof that our watches deliver."""
    annotations = dict(body.get("metadata", {}).get("annotations") or {})
    if state.sent_beat and annotations.get(HEARTBEAT_ANNOTATION) == state.sent_beat:
        state.health.beat("watch")
