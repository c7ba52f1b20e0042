"""What the controller does with its VMs' events, which come down its own watch (informer.py),
in that watch's thread: each goes to the binder; a change of what the store keeps of a VM
(vm_facts.py) goes to the sealer and the image guard, which read VMs from the store and keep
no copy of their own; and the leader makes the rare writes they ask for. Every replica feeds
its memory, so a standby takes over warm; only the leader writes.

A VM a new list lacks (deleted while no watch delivered it, the apiserver away or the watch's
version too old) comes as DELETED from the informer, with the facts its store kept: its room on
the node and its addresses are freed at once."""

import logging
from collections.abc import Callable
from typing import Any

from formation_vmm.controller.binding.binder import Binder
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

    def changed(self, old: Body | None, new: Body | None) -> None:
        """What the store keeps of a VM changed (before the event's handler runs)."""
        self.sealer.vm_changed(old, new)
        released = self.guard.vm_changed(old, new)
        if released and self.leading():
            for image in released:
                self.guard.release_if_unused(image)

    def event(self, kind: str | None, body: Body) -> None:
        """A watch event (``kind`` None for a VM a list found)."""
        meta = body["metadata"]
        self.binder.vm_event(kind, body)
        if kind == "DELETED" or not self.leading():
            return
        try:
            if self.binder.status_needs_repair(body):
                self.binder.repair_status(body)
        except Exception:
            # Said, and left: raised into the watch, it would end the watch request and list
            # every VM again. A status that names the wrong node is repaired at the VM's next
            # event.
            log.exception("repairing the status of VM %s/%s failed", meta.get("namespace"), meta.get("name"))
