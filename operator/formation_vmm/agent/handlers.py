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
from formation_vmm.agent.sync import VmSync
from formation_vmm.agent.watch import VmCache, Watcher
from formation_vmm.api.names import (
    AGENT_ENDPOINT_ANNOTATION,
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    GROUP,
    HEARTBEAT_ANNOTATION,
    NODE_LABEL,
    VERSION,
    VM_COUNT_ANNOTATION,
    VM_PLURAL,
    agent_finalizer,
    agent_prefix,
)
from formation_vmm.api.quantity import format_mebibytes, parse_quantity
from formation_vmm.config import Settings
from formation_vmm.kube import annotate_node

log = logging.getLogger(__name__)

# How long to wait before retrying a VM whose inputs or hypervisor were not ready.
RETRY_SECONDS = 10.0


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
        settings.persistence.finalizer = agent_finalizer(node)
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=agent_prefix(node))
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=agent_prefix(node), key="last-handled-configuration"
        )
        state: AgentMemo = memo.state
        watcher = Watcher(state.sync, state.hypervisor, state.cache, state.vm_exists)
        # Before the first libvirt call: the connection subscribes to events when it opens.
        state.hypervisor.listener = watcher.on_domain_event
        await asyncio.to_thread(publish_node, state)
        state.tasks = [
            asyncio.create_task(_heartbeat(state)),
            asyncio.create_task(watcher.run_events()),
            asyncio.create_task(watcher.run_resync(state.settings.resync_seconds)),
        ]

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        for task in state.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state.hypervisor.close()

    @kopf.on.event(GROUP, VERSION, VM_PLURAL, labels=mine, id="cache", registry=registry)
    def cache(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo.state.cache.update(event.get("type"), dict(event["object"]))

    @kopf.on.create(GROUP, VERSION, VM_PLURAL, labels=mine, id="reconcile", registry=registry)
    @kopf.on.resume(GROUP, VERSION, VM_PLURAL, labels=mine, id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, VM_PLURAL, labels=mine, id="reconcile", registry=registry)
    def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        result = state.sync.sync(dict(body))
        if result.permanent:
            raise kopf.PermanentError(result.permanent)
        if result.retry:
            raise kopf.TemporaryError(result.retry, delay=RETRY_SECONDS)

    @kopf.on.delete(GROUP, VERSION, VM_PLURAL, labels=mine, id="teardown", registry=registry)
    def teardown(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        log.info("%s/%s: deleted, removing its domain and files", body.metadata.namespace, body.metadata.name)
        memo.state.sync.delete(dict(body))
