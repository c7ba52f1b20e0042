"""Objects as the API has them, for every kind either process watches: a list, then a watch
from the list's version with bookmarks, in a thread of its own; listed again when the version is
too old to watch from (410) or the connection fails (client-go's reflector and informer, in
the few lines we need). Each event goes to one handler, in that thread.

A new list is compared with what the last one and the watch showed (the store, keyed by
namespace/name): an object it lacks was deleted while the watch was down, and the handler gets
that DELETED with the object as last seen; one that came back with another uid is a deletion and
a creation. So no kind misses a deletion. A store may keep less than the objects (the
controller's VMs: who they are, not their bodies); the agent's VMs keep none, their cache being
their store, and are told which uids a list found (their orphans need more than a deletion).
Why not kopf's watches: docs/decisions.md."""

import logging
import threading
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from formation_vmm.kube import ApiError, GoneError, Kube, Resource

log = logging.getLogger(__name__)

Body = dict[str, Any]
# Each watch request asks the apiserver to end it after this long (a new one starts at once):
# a connection that died silently is noticed within it.
WATCH_SECONDS = 60
# (event type, None for a listed object; the object). A handler that raises is logged: the
# informer goes on with the next event.
Handler = Callable[[str | None, Body], None]
Listed = Callable[[set[str]], None]  # the uids a (re)list found: the others are gone
# What the store kept of one object before an event and after it (None: absent), as client-go's
# OnUpdate(old, new) on the transformed object: a consumer that acts on a change of a few fields
# compares them here instead of keeping its own copy of every object.
Changed = Callable[[Body | None, Body | None], None]
# An index of the store: the values an object is found under (none: not in the index).
Indexer = Callable[[Body], Iterable[Hashable]]


def key_of(body: Body) -> str:
    meta = body.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


class Store:
    """Objects by namespace/name, and indexes of them (client-go's Indexer): thread-safe."""

    def __init__(self, indexers: Mapping[str, Indexer] | None = None) -> None:
        self._objects: dict[str, Body] = {}
        self._indexers = dict(indexers or {})
        self._index: dict[str, dict[Hashable, set[str]]] = {name: {} for name in self._indexers}
        self._lock = threading.Lock()

    def get(self, key: str) -> Body | None:
        with self._lock:
            return self._objects.get(key)

    def items(self) -> list[Body]:
        with self._lock:
            return list(self._objects.values())

    def by(self, index: str, value: Hashable) -> list[Body]:
        """The objects ``index`` finds under ``value``."""
        with self._lock:
            return [self._objects[key] for key in self._index[index].get(value, ())]

    def put(self, key: str, body: Body | None) -> Body | None:
        """Store (or, with None, forget) one object, the indexes in step; returns what it
        replaced."""
        with self._lock:
            old = self._objects.pop(key, None)
            for name, indexer in self._indexers.items():
                if old is not None:
                    for value in indexer(old):
                        keys = self._index[name].get(value)
                        if keys is not None:
                            keys.discard(key)
                            if not keys:
                                del self._index[name][value]
                if body is not None:
                    for value in indexer(body):
                        self._index[name].setdefault(value, set()).add(key)
            if body is not None:
                self._objects[key] = body
            return old


class Informer:
    def __init__(
        self,
        kube: Kube,
        resource: Resource | str,
        handler: Handler = lambda kind, body: None,  # run.py may wire it once its users exist
        *,
        label_selector: str = "",
        field_selector: str = "",
        listed: Listed | None = None,
        beat: Callable[[], None] = lambda: None,
        timeout_seconds: int = WATCH_SECONDS,
        retry_seconds: float = 1.0,
        name: str = "",
        indexers: Mapping[str, Indexer] | None = None,
        transform: Callable[[Body], Body] | None = None,
        changed: Changed | None = None,
    ) -> None:
        self.kube = kube
        self.resource = Resource(resource) if isinstance(resource, str) else resource
        self.handler = handler
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.listed = listed  # given: the consumer keeps the objects, and is told what a list found
        self.beat = beat  # each list and each watch request that ends well: the watch delivers
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self.name = name or f"watch-{self.resource.plural}"
        self.store = Store(indexers)
        # What the store keeps of each object (client-go's SetTransform): all of it, or less
        # (the controller keeps a VM's metadata, not its body). Handlers get the whole object,
        # and a deletion found by a list gets what the store kept.
        self.transform = transform or (lambda body: body)
        self.changed = changed  # called before the handler, with what the store kept before and after
        self.synced = threading.Event()  # the first list is in the store (client-go's HasSynced)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lists = 0  # how many lists it made: more than one after a 410 or a failure
        self.requests = 0  # how many watch requests ended well (each taken up where it ended)

    def get(self, key: str) -> Body | None:
        return self.store.get(key)

    def by(self, index: str, value: Hashable) -> list[Body]:
        return self.store.by(index, value)

    # --- the thread --------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or start again after stop(): the next list shows what changed meanwhile)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Asks the loop to end; a request in progress ends with its timeout (the thread is a
        daemon: it never holds the process)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        version = ""
        what = self.resource.plural
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._list()
                version = self._follow(version)
            except GoneError:
                log.info("the %s watch's version is too old: listing again", what)
                version = ""
            except (ApiError, OSError, ValueError) as exc:
                # The API away (kube.py makes that an ApiError), or a line cut short (bad JSON).
                log.warning("%s watch: %s; again in %.0f s", what, exc, self.retry_seconds)
                version = ""
                self._stop.wait(self.retry_seconds)
            except Exception:
                log.exception("%s watch failed; again in %.0f s", what, self.retry_seconds)
                version = ""
                self._stop.wait(self.retry_seconds)

    def _list(self) -> str:
        items, version = self.kube.list_at(self.resource, self.label_selector, self.field_selector)
        if self.listed is not None:
            for body in items:
                self._deliver(None, body)
            self.listed({str(body["metadata"].get("uid", "")) for body in items})
        else:
            fresh = {key_of(body): body for body in items}
            gone = [
                old
                for old in self.store.items()
                if key_of(old) not in fresh
                or fresh[key_of(old)]["metadata"].get("uid") != old["metadata"].get("uid")
            ]
            for old in gone:
                self._deliver("DELETED", old)
            for body in items:
                self._deliver(None, body)
        self.lists += 1
        self.synced.set()
        self.beat()
        return version

    def _follow(self, version: str) -> str:
        """One watch request from ``version``; returns the version to take up from."""
        events = self.kube.watch(
            self.resource, version, self.label_selector, self.timeout_seconds, self.field_selector
        )
        for kind, obj in events:
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind != "BOOKMARK":
                self._deliver(kind, obj)
            if self._stop.is_set():
                break
        self.requests += 1
        self.beat()
        return version

    def _deliver(self, kind: str | None, body: Body) -> None:
        if self.listed is None:
            kept = None if kind == "DELETED" else self.transform(body)
            old = self.store.put(key_of(body), kept)
            if self.changed is not None:
                self._call(self.changed, kind, body, old, kept)
        self._call(self.handler, kind, body, kind, body)

    def _call(self, hook: Callable[..., None], kind: str | None, body: Body, *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # logged; the informer goes on with the next event
            log.exception("handling a %s event of %s failed", kind or "listed", key_of(body))
