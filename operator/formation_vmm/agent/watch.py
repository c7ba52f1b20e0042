"""Everything that syncs VMs besides kopf's handlers: libvirt lifecycle events (a crash or a
guest shutdown shows in status within a second) and the periodic resync (drift: a domain removed
behind our back is recreated, a domain whose VM is gone is removed, IPs appear)."""

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.sync import VmSync
from formation_vmm.api.references import images_named
from formation_vmm.domain.naming import domain_name
from formation_vmm.kube import StatusWriter

log = logging.getLogger(__name__)

VmExists = Callable[[str, str, str], bool]  # (namespace, name, uid) -> still there, bound here


@dataclass
class VmCache:
    """The latest body of every VM bound to this node, by domain name, fed by kopf's watch."""

    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)

    def update(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = domain_name(meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self.bodies.pop(key, None)
        else:
            self.bodies[key] = body

    def get(self, key: str) -> dict[str, Any] | None:
        return self.bodies.get(key)

    def uids(self) -> set[str]:
        return {b["metadata"].get("uid") for b in self.bodies.values()}


class Watcher:
    """Every path by which a VM of this node gets synced: the watch (``handle``, from kopf),
    libvirt's lifecycle events, retries after a failure, and the periodic resync."""

    def __init__(
        self,
        sync: VmSync,
        hypervisor: Hypervisor,
        cache: VmCache,
        vm_exists: VmExists,
        writer: StatusWriter,
        finalizer: str,
        retry_seconds: float = 10.0,
    ) -> None:
        self.sync = sync
        self.hypervisor = hypervisor
        self.cache = cache
        self.vm_exists = vm_exists
        self.writer = writer
        self.finalizer = finalizer
        self.retry_seconds = retry_seconds
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._loop = asyncio.get_running_loop()

    def handle(self, body: dict[str, Any]) -> None:
        """One VM as the watch shows it now (called in a worker thread, one VM at a time)."""
        meta = body["metadata"]
        finalizers = meta.get("finalizers") or []
        if meta.get("deletionTimestamp"):
            if self.finalizer in finalizers:
                log.info("%s/%s: deleted, removing its domain and files", meta["namespace"], meta["name"])
                self.sync.delete(body)
                self.writer.remove_finalizer(body, self.finalizer)
            return
        if self.finalizer not in finalizers:
            # The controller adds it when it binds the VM; a VM labeled by other means gets it here.
            self.writer.add_finalizer(body, self.finalizer)
        result = self.sync.sync(body)
        if result.retry:
            name = domain_name(meta["namespace"], meta["name"])
            self._loop.call_soon_threadsafe(self._loop.call_later, self.retry_seconds, self._enqueue, name)

    def image_changed(self, namespace: str, image: str) -> None:
        """A VmImage appeared or changed: the VMs that wait for it need not wait for a retry."""
        for key, body in list(self.cache.bodies.items()):
            if body["metadata"]["namespace"] == namespace and image in images_named(body):
                self.poke(key)

    def poke(self, name: str) -> None:
        """Sync the VM of domain ``name`` soon (callable from any thread)."""
        self._loop.call_soon_threadsafe(self._enqueue, name)

    def on_domain_event(self, name: str, event: str) -> None:
        """Called from libvirt's event thread."""
        log.debug("domain %s: %s", name, event)
        metrics.DOMAIN_EVENTS.labels(event).inc()
        self.poke(name)

    def _enqueue(self, name: str) -> None:
        if name not in self._queued:
            self._queued.add(name)
            self.queue.put_nowait(name)

    async def run_events(self) -> None:
        while True:
            name = await self.queue.get()
            self._queued.discard(name)
            body = self.cache.get(name)
            if body is None:
                continue
            try:
                await asyncio.to_thread(self.handle, body)
            except Exception:  # one VM's failure must not stop the others' events
                log.exception("sync after a libvirt event on %s failed", name)

    async def run_resync(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self.resync_once)
            except Exception:
                log.exception("periodic resync failed")

    def resync_once(self) -> None:
        try:
            domains = self.hypervisor.owned_domains()
        except HypervisorError as exc:
            log.warning("resync: %s", exc)
            return
        known = self.cache.uids()
        for info in domains:
            owner = info.owner
            if owner is None or owner.uid in known:
                continue
            # Not in our cache: confirm with the API before removing anything, so a cache that
            # is late never costs a VM its domain.
            if not self.vm_exists(owner.namespace, owner.name, owner.uid):
                log.warning(
                    "removing domain %s: its VM %s/%s is gone", info.name, owner.namespace, owner.name
                )
                self.sync.delete(
                    {"metadata": {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid}},
                    grace_seconds=0,
                )
        for body in list(self.cache.bodies.values()):
            try:
                self.handle(body)
            except Exception:
                log.exception(
                    "resync of %s/%s failed", body["metadata"]["namespace"], body["metadata"]["name"]
                )
