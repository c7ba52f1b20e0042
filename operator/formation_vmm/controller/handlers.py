"""kopf handlers of the controller. The controller only watches (kopf ``on.event``: no
finalizers, no annotations written on VMs) and hands what it sees to the Binder, whose own loop
binds VMs and watches node health."""

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import kopf

from formation_vmm.api.names import (
    GROUP,
    HYPERVISOR_LABEL,
    IMAGE_PLURAL,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VERSION,
    VM_PLURAL,
)
from formation_vmm.config import Settings
from formation_vmm.controller.binder import Binder
from formation_vmm.controller.image_guard import ImageGuard
from formation_vmm.controller.snapshot_notes import SnapshotNotes
from formation_vmm.kube import node_summary

log = logging.getLogger(__name__)

# A pending VM is tried again at least this often, even when nothing announced new capacity
# (a heartbeat that turned fresh is not a watch event the binder reacts to by itself).
RETRY_SECONDS = 5.0


@dataclass
class ControllerMemo:
    settings: Settings
    binder: Binder
    guard: ImageGuard
    notes: SnapshotNotes
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def _bind_loop(binder: Binder, guard: ImageGuard) -> None:
    while True:
        await asyncio.to_thread(binder.changed.wait, RETRY_SECONDS)
        binder.changed.clear()
        try:
            await asyncio.to_thread(binder.bind_pending)
            await asyncio.to_thread(binder.mark_lost_nodes)
            for image in guard.pending():  # deleted images held for their VMs: look again
                await asyncio.to_thread(guard.release_if_unused, image)
        except Exception:  # the loop must outlive any one failure
            log.exception("binding pass failed")


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.watching.label_selectors["nodes"] = f"{HYPERVISOR_LABEL}=true"
        state: ControllerMemo = memo.state
        state.tasks = [asyncio.create_task(_bind_loop(state.binder, state.guard))]

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        for task in memo.state.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # Async on purpose: these only update the binder's memory (a thread hop per watch event
    # would cost more than the work); the rare API write goes to a thread.
    @kopf.on.event("", "v1", "nodes", labels={HYPERVISOR_LABEL: "true"}, id="nodes", registry=registry)
    async def nodes(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo.state.binder.node_event(event.get("type"), node_summary(dict(event["object"])))

    @kopf.on.event(GROUP, VERSION, VM_PLURAL, id="vms", registry=registry)
    async def vms(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        binder: Binder = memo.state.binder
        body = dict(event["object"])
        binder.vm_event(event.get("type"), body)
        guard: ImageGuard = memo.state.guard
        for image in guard.vm_event(event.get("type"), body):
            await asyncio.to_thread(guard.release_if_unused, image)
        if event.get("type") != "DELETED" and binder.status_needs_repair(body):
            await asyncio.to_thread(binder.repair_status, body)

    @kopf.on.event(GROUP, VERSION, IMAGE_PLURAL, id="images", registry=registry)
    def images(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo.state.guard.image_event(event.get("type"), dict(event["object"]))

    @kopf.on.event(GROUP, VERSION, SNAPSHOT_PLURAL, id="snapshots", registry=registry)
    def snapshots(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        if event.get("type") != "DELETED":
            memo.state.notes.event(SNAPSHOT_KIND, dict(event["object"]))

    @kopf.on.event(GROUP, VERSION, RESTORE_PLURAL, id="restores", registry=registry)
    def restores(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        if event.get("type") != "DELETED":
            memo.state.notes.event(RESTORE_KIND, dict(event["object"]))
