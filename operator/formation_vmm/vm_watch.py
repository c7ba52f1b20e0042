"""VMs as the API has them: a list, then a watch from the list's version with bookmarks, in a
thread of its own; listed again when the version is too old to watch from (410) or the
connection fails, and a VM the new list lacks is reported as gone. The agent's is filtered by
its node's label by the apiserver (a VM whose binding moves away comes as DELETED); the
controller's has every VM. Why not kopf's watch: docs/decisions.md."""

import logging
import threading
from collections.abc import Callable
from typing import Any

from formation_vmm.api.names import VM_PLURAL
from formation_vmm.kube import ApiError, GoneError, Kube

log = logging.getLogger(__name__)

Body = dict[str, Any]
# Each watch request asks the apiserver to end it after this long (a new one starts at once):
# a connection that died silently is noticed within it.
WATCH_SECONDS = 60
Deliver = Callable[[str | None, Body], None]  # (event type, None for a listed VM; the VM)
Listed = Callable[[set[str]], None]  # the uids a (re)list found: the others are gone


class VmWatch:
    def __init__(
        self,
        kube: Kube,
        selector: str,
        deliver: Deliver,
        listed: Listed,
        beat: Callable[[], None] = lambda: None,
        timeout_seconds: int = WATCH_SECONDS,
        retry_seconds: float = 1.0,
        name: str = "vm-watch",
    ) -> None:
        self.kube = kube
        self.selector = selector  # a label selector; "" for every VM
        self.name = name
        self.deliver = deliver
        self.listed = listed
        self.beat = beat  # each list and each watch request that ends well: the watch delivers
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lists = 0  # how many lists it made: more than one after a 410 or a failure
        self.requests = 0  # how many watch requests ended well (each taken up where it ended)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Asks the loop to end; a request in progress ends with its timeout (the thread is a
        daemon: it never holds the process)."""
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._list()
                version = self._follow(version)
            except GoneError:
                log.info("the VM watch's version is too old: listing again")
                version = ""
            except (ApiError, OSError, ValueError) as exc:
                # The API away (kube.py makes that an ApiError), or a line cut short (bad JSON).
                log.warning("VM watch: %s; again in %.0f s", exc, self.retry_seconds)
                version = ""
                self._stop.wait(self.retry_seconds)
            except Exception:
                log.exception("VM watch failed; again in %.0f s", self.retry_seconds)
                version = ""
                self._stop.wait(self.retry_seconds)

    def _list(self) -> str:
        items, version = self.kube.list_at(VM_PLURAL, self.selector)
        for body in items:
            self.deliver(None, body)
        self.listed({str(body["metadata"].get("uid", "")) for body in items})
        self.lists += 1
        self.beat()
        return version

    def _follow(self, version: str) -> str:
        """One watch request from ``version``; returns the version to take up from."""
        for kind, obj in self.kube.watch(VM_PLURAL, version, self.selector, self.timeout_seconds):
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind != "BOOKMARK":
                self.deliver(kind, obj)
            if self._stop.is_set():
                break
        self.requests += 1
        self.beat()
        return version
