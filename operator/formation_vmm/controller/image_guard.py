"""Keeps a VmImage that VMs still use from being deleted under them: every VmImage carries the
controller's finalizer; a deleted one keeps it, with condition InUse naming the VMs, until the
last of them is gone. The VMs' informer tells when to look again (a VM no longer names an image,
or went away), and the images' store says which are held; the decision to release is made from
a fresh list of the namespace's VMs, never from a store alone, so a controller that just started
and has not seen every VM yet cannot release too early."""

import logging
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import VmImageStatus
from formation_vmm.api.names import IMAGE_FINALIZER, IMAGE_KIND
from formation_vmm.api.references import referenced_images
from formation_vmm.informer import Informer
from formation_vmm.kube import EventRecorder, StatusWriter

log = logging.getLogger(__name__)

ListVms = Callable[[str], list[dict[str, Any]]]  # namespace -> the VMs in it, from the API


def in_use_message(users: list[str]) -> str:
    shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
    return f"deletion waits: VirtualMachine(s) {shown} still use this image; delete them first"


HELD = "held"  # the images' store index: True for a deleted image our finalizer holds


def held(body: dict[str, Any]) -> Iterable[Hashable]:
    meta = body["metadata"]
    return (
        [True] if meta.get("deletionTimestamp") and IMAGE_FINALIZER in (meta.get("finalizers") or []) else []
    )


class ImageGuard:
    def __init__(
        self, writer: StatusWriter[VmImageStatus], events: EventRecorder, list_vms: ListVms, images: Informer
    ) -> None:
        """``images``: the VmImages' informer, indexed by ``HELD``."""
        self.writer = writer
        self.events = events
        self.list_vms = list_vms
        self.images = images

    def vm_changed(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[dict[str, Any]]:
        """What the store keeps of a VM (vm_facts.py) changed: the held images it no longer
        names, which may be released now."""
        if old is None:
            return []
        namespace = old["metadata"].get("namespace", "")
        dropped = set(old.get("images") or ()) - set((new or {}).get("images") or ())
        found = (self.images.get(f"{namespace}/{name}") for name in sorted(dropped))
        return [image for image in found if image is not None and held(image)]

    def users(self, namespace: str, image: str) -> list[str]:
        return sorted(
            vm["metadata"]["name"] for vm in self.list_vms(namespace) if image in referenced_images(vm)
        )

    def image_event(self, event_type: str | None, body: dict[str, Any], write: bool = True) -> None:
        """Add the finalizer to a live image; release or hold a deleted one. Runs in the
        informer's thread. With ``write`` False (a standby controller) it does nothing: the store
        remembers."""
        meta = body["metadata"]
        finalizers = meta.get("finalizers") or []
        if event_type == "DELETED":
            return
        if not meta.get("deletionTimestamp"):
            if IMAGE_FINALIZER not in finalizers and write:
                self.writer.add_finalizer(body, IMAGE_FINALIZER)
            return
        if IMAGE_FINALIZER not in finalizers:
            return
        if write:
            self.release_if_unused(body)

    def release_if_unused(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        users = self.users(namespace, name)
        if users:
            message = in_use_message(users)
            old = get_condition(self.writer.status_of(body).conditions, "InUse")
            if old is None or old.message != message:
                self.writer.write(
                    body,
                    lambda st: VmImageStatus(
                        conditions=set_condition(st.conditions, "InUse", True, "UsedByVMs", message)
                    ),
                )
                self.events.post(body, IMAGE_KIND, "DeletionBlocked", message, "Warning")
            return
        log.info("VmImage %s/%s: no VM uses it any more, releasing it", namespace, name)
        self.writer.remove_finalizer(body, IMAGE_FINALIZER)

    def pending(self) -> list[dict[str, Any]]:
        """Deleted images held for their VMs, as the images' store shows them."""
        return self.images.by(HELD, True)
