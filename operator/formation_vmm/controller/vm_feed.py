"""What the controller does with its VMs' events, which come down its own watch (informer.py),
in that watch's thread: each goes to the binder, the sealer and the image guard (each keeps its
memory under its own lock), and the leader makes the rare writes they ask for. Every replica
feeds its memory, so a standby takes over warm; only the leader writes.

The feed also remembers each VM's name, so that a VM a new list lacks (deleted while no watch
delivered it, the apiserver away or the watch's version too old) is forgotten as if its
deletion had come: its room on the node and its addresses are freed at once, where kopf's
re-list left them held until the controller restarted."""

import logging
import threading
from collections.abc import Callable
from typing import Any

from formation_vmm.controller.binder import Binder
from formation_vmm.controller.image_guard import ImageGuard
from formation_vmm.controller.sealer import Sealer

log = logging.getLogger(__name__)

Body = dict[str, Any]


class VmFeed:
    def __init__(
        self, binder: Binder, sealer: Sealer, guard: ImageGuard, leading: Callable[[], bool]
    ) -> None:
        self.binder = binder
        self.sealer = sealer
        self.guard = guard
        self.leading = leading
        self._names: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name), of every VM seen
        self._lock = threading.Lock()

    def event(self, kind: str | None, body: Body) -> None:
        """A watch event (``kind`` None for a VM a list found)."""
        meta = body["metadata"]
        with self._lock:
            if kind == "DELETED":
                self._names.pop(str(meta.get("uid", "")), None)
            else:
                self._names[str(meta.get("uid", ""))] = (meta["namespace"], meta["name"])
        self.binder.vm_event(kind, body)
        self.sealer.vm_event(kind, body)
        released = self.guard.vm_event(kind, body)
        if not self.leading():
            return
        try:
            for image in released:
                self.guard.release_if_unused(image)
            if kind != "DELETED" and self.binder.status_needs_repair(body):
                self.binder.repair_status(body)
        except Exception:
            # Said, and left: raised into the watch, it would end the watch request and list
            # every VM again. A held image is looked at again by each binding pass; a status
            # that names the wrong node, at the VM's next event.
            log.exception("acting on VM %s/%s failed", meta.get("namespace"), meta.get("name"))

    def listed(self, uids: set[str]) -> None:
        """``uids``: every VM a (re)list found. The others are gone."""
        with self._lock:
            gone = [(uid, where) for uid, where in self._names.items() if uid not in uids]
        for uid, (namespace, name) in gone:
            log.warning("VM %s/%s is gone, though its deletion never came down the watch", namespace, name)
            self.event("DELETED", {"metadata": {"uid": uid, "namespace": namespace, "name": name}})
