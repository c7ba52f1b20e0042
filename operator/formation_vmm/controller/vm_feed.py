"""What the controller does with its VMs' events, which come down its own watch (informer.py),
in that watch's thread: each goes to the binder, the sealer and the image guard (each keeps its
memory under its own lock), and the leader makes the rare writes they ask for. Every replica
feeds its memory, so a standby takes over warm; only the leader writes.

A VM a new list lacks (deleted while no watch delivered it, the apiserver away or the watch's
version too old) comes as DELETED from the informer, with the metadata its store kept
(``vm_reference``): its room on the node and its addresses are freed at once."""

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

    def event(self, kind: str | None, body: Body) -> None:
        """A watch event (``kind`` None for a VM a list found)."""
        meta = body["metadata"]
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


def vm_reference(body: Body) -> Body:
    """What the controller's VM informer keeps of a VM: who it is, not its body (the binder
    keeps the sums and facts it needs, docs/decisions.md)."""
    meta = body["metadata"]
    return {"metadata": {key: meta[key] for key in ("uid", "namespace", "name") if key in meta}}
