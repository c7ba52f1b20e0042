"""Keeps a VmImage that VMs still use from being deleted under them: every VmImage carries the
controller's finalizer; a deleted one keeps it, with condition InUse naming the VMs, until the
last of them is gone. The watch tells when to look again (a VM changed or went away); the
decision to release is made from a fresh list of the namespace's VMs, never from memory alone,
so a controller that just started and has not seen every VM yet cannot release too early."""

import logging
import threading
from collections.abc import Callable
from typing import Any

from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import VmImageStatus
from formation_vmm.api.names import IMAGE_FINALIZER, IMAGE_KIND
from formation_vmm.api.references import referenced_images
from formation_vmm.kube import EventRecorder, StatusWriter

log = logging.getLogger(__name__)

Key = tuple[str, str]
ListVms = Callable[[str], list[dict[str, Any]]]  # namespace -> the VMs in it, from the API


def in_use_message(users: list[str]) -> str:
    shown = ", ".join(users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
    return f"deletion waits: VirtualMachine(s) {shown} still use this image; delete them first"


class ImageGuard:
    def __init__(self, writer: StatusWriter[VmImageStatus], events: EventRecorder, list_vms: ListVms) -> None:
        self.writer = writer
        self.events = events
        self.list_vms = list_vms
        self._uses: dict[Key, set[str]] = {}  # VM -> images it names
        self._deleting: dict[Key, dict[str, Any]] = {}  # VmImages waiting for their users
        self._lock = threading.Lock()

    def vm_event(self, event_type: str | None, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Record a VM's images; returns the deleted images that may now be released."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        with self._lock:
            before = self._uses.get(key, set())
            if event_type == "DELETED":
                self._uses.pop(key, None)
                after: set[str] = set()
            else:
                after = referenced_images(body)
                self._uses[key] = after
            released = before - after
            return [b for (ns, name), b in self._deleting.items() if ns == key[0] and name in released]

    def users(self, namespace: str, image: str) -> list[str]:
        return sorted(
            vm["metadata"]["name"] for vm in self.list_vms(namespace) if image in referenced_images(vm)
        )

    def image_event(self, event_type: str | None, body: dict[str, Any], write: bool = True) -> None:
        """Add the finalizer to a live image; release or hold a deleted one. Runs in a thread.
        With ``write`` False (a standby controller) it only remembers what it saw."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        finalizers = meta.get("finalizers") or []
        if event_type == "DELETED":
            with self._lock:
                self._deleting.pop(key, None)
            return
        if not meta.get("deletionTimestamp"):
            if IMAGE_FINALIZER not in finalizers and write:
                self.writer.add_finalizer(body, IMAGE_FINALIZER)
            return
        if IMAGE_FINALIZER not in finalizers:
            return
        with self._lock:
            self._deleting[key] = body
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
        with self._lock:
            self._deleting.pop((namespace, name), None)

    def pending(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._deleting.values())
