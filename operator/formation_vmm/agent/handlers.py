"""kopf handlers of the agent. Thin: every VM change goes to VmSync, which decides and reports."""

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.inputs import ImageCatalog
from formation_vmm.agent.snapshots import Snapshots
from formation_vmm.agent.sync import VmSync
from formation_vmm.agent.watch import VmCache, Watcher
from formation_vmm.api.names import (
    AGENT_ENDPOINT_ANNOTATION,
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    GROUP,
    HEARTBEAT_ANNOTATION,
    IMAGE_PLURAL,
    NODE_LABEL,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VERSION,
    VM_COUNT_ANNOTATION,
    VM_PLURAL,
    agent_finalizer,
)
from formation_vmm.api.quantity import format_mebibytes, parse_quantity
from formation_vmm.config import Settings
from formation_vmm.images.node import GarbageCollector, NodeImages
from formation_vmm.kube import annotate_node

log = logging.getLogger(__name__)

# How long to wait before retrying a VM whose inputs or hypervisor were not ready.
RETRY_SECONDS = 10.0
HANDLER_THREADS = 16


@dataclass
class AgentMemo:
    settings: Settings
    node: str
    hypervisor: Hypervisor
    sync: VmSync
    api: client.CoreV1Api
    vm_exists: Any
    endpoint: str
    cache: VmCache = field(default_factory=VmCache)
    images: ImageCatalog = field(default_factory=ImageCatalog)
    node_images: NodeImages | None = None
    snapshots: Snapshots | None = None
    watcher: Watcher | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def publish_node(memo: AgentMemo) -> None:
    """Write this node's capacity (less the reserve), VM count, endpoint and a heartbeat."""
    cpus, memory = memo.hypervisor.capacity()
    settings = memo.settings
    annotate_node(
        memo.api,
        memo.node,
        {
            CAPACITY_CPUS_ANNOTATION: str(max(cpus - settings.reserved_cpus, 0)),
            CAPACITY_MEMORY_ANNOTATION: format_mebibytes(
                max(memory - parse_quantity(settings.reserved_memory), 0)
            ),
            VM_COUNT_ANNOTATION: str(len(memo.cache.bodies)),
            AGENT_ENDPOINT_ANNOTATION: memo.endpoint,
            HEARTBEAT_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )


async def _image_gc(memo: AgentMemo) -> None:
    assert memo.node_images is not None
    collector = GarbageCollector(memo.node_images, memo.settings.image_gc_grace_seconds)
    while True:
        # First sleep, then collect: by then the watch has listed every VmImage.
        await asyncio.sleep(memo.settings.image_gc_interval_seconds)
        try:
            await asyncio.to_thread(collector.collect, memo.images.all())
        except Exception:
            log.exception("image garbage collection failed")


async def _retry_snapshots(memo: AgentMemo) -> None:
    assert memo.snapshots is not None
    while True:
        await asyncio.sleep(memo.settings.resync_seconds)
        try:
            await asyncio.to_thread(memo.snapshots.retry_waiting)
        except Exception:
            log.exception("snapshot retry failed")


async def _heartbeat(memo: AgentMemo) -> None:
    while True:
        try:
            await asyncio.to_thread(publish_node, memo)
        except Exception:  # a missed beat is logged and retried, never fatal
            log.exception("cannot publish the heartbeat of node %s", memo.node)
        await asyncio.sleep(memo.settings.heartbeat_seconds)


def register(registry: kopf.OperatorRegistry, node: str) -> None:
    mine = {NODE_LABEL: node}

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        # Only this node's VMs come down the watch: the apiserver filters, not every agent.
        settings.watching.label_selectors[GROUP, VM_PLURAL] = f"{NODE_LABEL}={node}"
        # Each VM's sync blocks a thread on libvirt and the API; kopf's default pool (cores + 4)
        # would make a burst of new VMs queue behind a handful of threads.
        settings.execution.max_workers = HANDLER_THREADS
        state: AgentMemo = memo.state
        state.watcher = Watcher(
            state.sync,
            state.hypervisor,
            state.cache,
            state.vm_exists,
            state.sync.status,
            agent_finalizer(node),
            RETRY_SECONDS,
        )
        # Before the first libvirt call: the connection subscribes to events when it opens.
        state.hypervisor.listener = state.watcher.on_domain_event
        if state.node_images is not None:
            state.node_images.notify = state.watcher.image_changed
        if state.snapshots is not None:
            state.snapshots.poke = state.watcher.poke
        await asyncio.to_thread(publish_node, state)
        state.tasks = [
            asyncio.create_task(_heartbeat(state)),
            asyncio.create_task(state.watcher.run_events()),
            asyncio.create_task(state.watcher.run_resync(state.settings.resync_seconds)),
        ]
        if state.node_images is not None:
            state.tasks.append(asyncio.create_task(_image_gc(state)))
        if state.snapshots is not None:
            state.tasks.append(asyncio.create_task(_retry_snapshots(state)))

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        for task in state.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.hypervisor.close()
        if state.node_images is not None:
            state.node_images.close()

    # Only a watch handler: the agent decides from the VM and the domain as they are, so it
    # needs none of kopf's per-object bookkeeping (annotations, its own finalizer), each of which
    # would cost a write per VM. The finalizer that guards deletion is ours (see Watcher.handle).
    @kopf.on.event(GROUP, VERSION, IMAGE_PLURAL, id="image", registry=registry)
    def image_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        image = state.images.observe(event.get("type"), dict(event["object"]))
        if event.get("type") == "DELETED":
            return
        if (
            image.spec.prefetch == "AllNodes"
            and state.node_images is not None
            and not image.metadata.deletion_timestamp
        ):
            state.node_images.prefetch(image)
        if state.watcher is not None:
            state.watcher.image_changed(image.metadata.namespace or "", image.metadata.name)

    @kopf.on.event(GROUP, VERSION, VM_PLURAL, labels=mine, id="vm", registry=registry)
    def vm_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        body = dict(event["object"])
        state.cache.update(event.get("type"), body)
        if event.get("type") != "DELETED" and state.watcher is not None:
            state.watcher.handle(body)

    _register_snapshots(registry)


def _register_snapshots(registry: kopf.OperatorRegistry) -> None:
    """Snapshots and restores of every namespace: each agent acts on those of its own VMs."""

    @kopf.on.event(GROUP, VERSION, SNAPSHOT_PLURAL, id="snapshot", registry=registry)
    def snapshot_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        if memo.state.snapshots is not None:
            memo.state.snapshots.event(SNAPSHOT_KIND, event.get("type"), dict(event["object"]))

    @kopf.on.event(GROUP, VERSION, RESTORE_PLURAL, id="restore", registry=registry)
    def restore_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        if memo.state.snapshots is not None:
            memo.state.snapshots.event(RESTORE_KIND, event.get("type"), dict(event["object"]))
