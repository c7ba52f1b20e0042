"""The agent's VM controller: every path by which a VM of this node gets synced, and the queue
they share (as a Kubernetes controller's event handlers feed its work queue): the watch (a VM
changed), libvirt's lifecycle events (run.py's listener queues them, less the echoes of our own
calls, agent/vms/echoes.py: a crash or a guest shutdown shows in status within a second), retries
and stop deadlines, and the periodic resync (drift: a domain removed behind our back is
recreated, a domain whose VM is gone is removed, IPs appear). Each only queues the domain's
name; the queue's workers do the syncing."""

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.state import DomainInfo
from formation_vmm.agent.vms.migration_marks import MigrationMarks
from formation_vmm.agent.vms.sync import SyncResult, VmSync
from formation_vmm.agent.vms.vm_metrics import VmLabels
from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import DEFAULT_NETWORK, NODE_LABEL, VM_PLURAL
from formation_vmm.api.references import referenced_images
from formation_vmm.domain.naming import domain_name
from formation_vmm.kube import ApiError, Kube, StatusWriter
from formation_vmm.workqueue import Lane

log = logging.getLogger(__name__)

Body = dict[str, Any]
VmExists = Callable[[str, str, str], bool]  # (namespace, name, uid) -> still there, bound here


def bound_here(kube: Kube, node: str) -> VmExists:
    """Whether a VM still exists with that uid, bound to ``node``. Any doubt (an API error)
    answers yes: it guards the removal of domains."""

    def exists(namespace: str, name: str, uid: str) -> bool:
        try:
            vm = kube.get_or_none(VM_PLURAL, namespace, name)
        except ApiError:
            return True
        meta = (vm or {}).get("metadata", {})
        return bool(meta.get("uid") == uid and (meta.get("labels") or {}).get(NODE_LABEL) == node)

    return exists


class VmCache:
    """The latest body of every VM bound to this node, by domain name, fed by the watch."""

    def __init__(self) -> None:
        self._bodies: dict[str, Body] = {}
        self._own: dict[str, str] = {}  # domain name -> resourceVersion of our last status write
        self._lock = threading.Lock()

    def update(self, event_type: str | None, body: Body) -> tuple[str, bool]:
        """Hold ``body``; returns the domain's name and whether the body is news: False when it
        is the version our own last status write made (the watch echoing it: the sync that
        wrote it saw all there is to see) or the very version held already."""
        meta = body["metadata"]
        key = domain_name(meta["namespace"], meta["name"])
        version = meta.get("resourceVersion")
        with self._lock:
            held = (self._bodies.get(key) or {}).get("metadata", {})
            same_uid = held.get("uid") == meta.get("uid")
            if event_type == "DELETED":
                if same_uid:
                    self._bodies.pop(key, None)
                self._own.pop(key, None)
                return key, True
            echo = self._own.pop(key, None) == version
            news = not echo and not (same_uid and held.get("resourceVersion") == version)
            self._bodies[key] = body
        return key, news

    def written(self, since: str | None, written: Body) -> None:
        """Our status write made ``written``, from the copy at version ``since`` (None: not
        from the cache's): called once, from the writing thread, as the write returns. Its
        version is remembered, so the watch's echo of it is no news; and it replaces the held
        copy if that is still the one the write was made from (resourceVersions compared for
        equality only, never ordered: a newer version from the watch is never replaced). Without
        the latter a domain event that echoes our own start finds the old body, and the sync
        reads the VM from the API again for nothing (one GET per VM in a burst)."""
        meta = written["metadata"]
        key = domain_name(meta["namespace"], meta["name"])
        with self._lock:
            self._own[key] = meta.get("resourceVersion", "")
            held = self._bodies.get(key)
            if since is not None and held is not None and held["metadata"].get("resourceVersion") == since:
                self._bodies[key] = written

    def drop(self, key: str, uid: str) -> None:
        """Forget the VM (a deletion the watch never delivered)."""
        with self._lock:
            if (self._bodies.get(key) or {}).get("metadata", {}).get("uid") == uid:
                self._bodies.pop(key, None)

    def get(self, key: str) -> Body | None:
        with self._lock:
            return self._bodies.get(key)

    def names(self) -> list[str]:
        """Domain names of every cached VM."""
        with self._lock:
            return list(self._bodies)

    def uids(self) -> set[str]:
        with self._lock:
            return {b["metadata"].get("uid") for b in self._bodies.values()}

    def users_of(self, namespace: str, image: str) -> list[str]:
        """Domain names of the VMs in ``namespace`` that name VmImage ``image``."""
        with self._lock:
            return [
                key
                for key, body in self._bodies.items()
                if body["metadata"]["namespace"] == namespace and image in referenced_images(body)
            ]

    def users_of_network(self, network: str) -> list[str]:
        """Domain names of the VMs with an interface on VmNetwork ``network``."""
        with self._lock:
            return [
                key
                for key, body in self._bodies.items()
                if any(
                    (n.get("network") or DEFAULT_NETWORK) == network
                    for n in (body.get("spec") or {}).get("networks") or []
                )
            ]

    def vms(self) -> list[VirtualMachine]:
        """Every cached VM, as models (the VMs that are being deleted too: their domains hold
        their addresses until they go)."""
        with self._lock:
            bodies = list(self._bodies.values())
        return [VirtualMachine.model_validate(body) for body in bodies]

    def labels(self) -> dict[str, VmLabels]:
        """What /metrics labels each domain's series with, by domain name."""
        with self._lock:
            bodies = list(self._bodies.items())
        return {
            key: VmLabels(
                namespace=body["metadata"].get("namespace", ""),
                name=body["metadata"].get("name", ""),
                phase=str((body.get("status") or {}).get("phase") or ""),
                networks=tuple(
                    str(n.get("name", "")) for n in (body.get("spec") or {}).get("networks") or []
                ),
                ready=any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (body.get("status") or {}).get("conditions") or []
                ),
            )
            for key, body in bodies
        }

    def __len__(self) -> int:
        with self._lock:
            return len(self._bodies)


class VmController:
    def __init__(
        self,
        sync: VmSync,
        hypervisor: Hypervisor,
        cache: VmCache,
        queue: Lane,
        vm_exists: VmExists,
        writer: StatusWriter[Any],
        finalizer: str,
        files_root: Path,
        marks: MigrationMarks,
    ) -> None:
        self.sync = sync
        self.hypervisor = hypervisor
        self.cache = cache
        self.queue = queue
        self.vm_exists = vm_exists
        self.writer = writer
        self.finalizer = finalizer
        self.files_root = files_root
        # VMs a live migration moves away from here (their sync waits until it has ended: the
        # guest may run on the target already) or brings here (the domain prepared for one is
        # not an orphan, though the VM is bound elsewhere yet).
        self.marks = marks

    def mine(self, info: DomainInfo) -> bool:
        """A domain of ours on this node: its metadata names a VM, and its files lie in this
        agent's directories (a libvirtd may be shared with another agent or cluster)."""
        return (
            info.owner is not None
            and info.console_log is not None
            and Path(info.console_log).is_relative_to(self.files_root)
        )

    # --- what asks for a sync ------------------------------------------------------------------

    def vm_event(self, event_type: str | None, body: Body) -> None:
        """A watch event of a VM bound to this node (informer.py). The echo of our own status
        write is not queued: a resourceVersion names one content, and the domain's own changes
        come as libvirt events (in a burst this halves the syncs: a plan and a describe per VM)."""
        key, news = self.cache.update(event_type, body)
        if event_type != "DELETED" and news:
            self.queue.add(key)

    def image_changed(self, namespace: str, image: str) -> None:
        """A VmImage appeared or changed: the VMs that wait for it need not wait for a retry."""
        for key in self.cache.users_of(namespace, image):
            self.queue.add(key)

    def resync(self) -> None:
        """Queue every VM of the cache, and every domain of ours whose VM the cache lacks (an
        orphan: removed once the API confirms its VM is gone). A VM deleted while the watch was
        down leaves the cache with the informer's next list (``forget_unlisted``)."""
        metrics.RESYNCS.inc()
        try:
            domains = self.hypervisor.owned_domains()
        except HypervisorError as exc:
            log.warning("resync: %s", exc)
            domains = []
        known = self.cache.uids()
        for info in domains:
            if self.mine(info) and info.owner is not None and info.owner.uid not in known:
                self.queue.add(info.name)
        for key in self.cache.names():
            self.queue.add(key)

    def forget_unlisted(self, listed: set[str]) -> None:
        """``listed``: the uids of this node's VMs as a list from the API shows them (the VM
        informer's, at its start and after a broken watch). A VM of the cache not among them was
        deleted or moved away while no watch delivered it: dropped, and its domain looked at
        as an orphan's (removed once the API confirms)."""
        for key in self.cache.names():
            body = self.cache.get(key)
            uid = (body or {}).get("metadata", {}).get("uid", "")
            if body is not None and uid not in listed:
                log.warning("VM %s is gone from the API, though no deletion came down the watch", key)
                self.cache.drop(key, uid)
                self.queue.add(key)

    # --- the sync itself, in a queue worker ---------------------------------------------------

    def process(self, key: str) -> float | None:
        """One key's sync; returns when to look at it again (the queue sees to it)."""
        body = self.cache.get(key)
        if body is None:
            self._orphan(key)
            return None
        result = self.handle(body)
        if result.gone:
            self.cache.drop(key, body["metadata"].get("uid", ""))
            self.queue.add(key)  # now an orphan: removed once the API confirms
            return None
        return result.retry_after

    def handle(self, body: Body) -> SyncResult:
        """One VM as the cache shows it now."""
        meta = body["metadata"]
        finalizers = meta.get("finalizers") or []
        if meta.get("deletionTimestamp"):
            if self.finalizer not in finalizers:
                return SyncResult(finished=True)
            result = self.sync.delete(body)
            if result.finished:
                log.info("%s/%s: domain and files removed", meta["namespace"], meta["name"])
                self.writer.remove_finalizer(body, self.finalizer)
            return result
        if self.marks.role(meta.get("uid", "")) == "out":
            return SyncResult(retry_after=self.sync.retry_seconds, outcome="waiting")
        if self.finalizer not in finalizers:
            # The controller adds it when it binds the VM; a VM labeled by other means gets it here.
            self.writer.add_finalizer(body, self.finalizer)
        return self.sync.sync(body)

    def _orphan(self, key: str) -> None:
        """A domain named ``key`` whose VM is not in the cache: removed (at once: its VM is gone)
        if the API confirms the VM no longer exists here, so a late cache never costs a VM its
        domain."""
        try:
            info = self.hypervisor.describe(key)
        except HypervisorError as exc:
            log.warning("cannot look at domain %s: %s", key, exc)
            return
        owner = info.owner if info is not None and self.mine(info) else None
        if owner is None or self.marks.role(owner.uid) == "in":
            return
        if self.vm_exists(owner.namespace, owner.name, owner.uid):
            return
        log.warning("removing domain %s: its VM %s/%s is gone", key, owner.namespace, owner.name)
        orphan = {"metadata": {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid}}
        self.sync.delete(orphan, grace_seconds=0)
