"""A work queue of keys (domain names) served by a fixed pool of threads, as client-go's
workqueue: a key queued many times is processed once; a key is never processed by two threads
at once (queued again while it is processed, it runs once more afterwards); keys may be queued
for later, and a key waits for at most one such moment (the earliest asked for), so retries
asked for again and again do not pile up. Whatever asks for a sync (the watch, libvirt's
events, retries, a stop's deadline, the periodic resync) only queues a key, so nothing waits
on the hypervisor but these workers."""

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)

Handler = Callable[[str], None]


class WorkQueue:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()  # queued, not yet taken
        self._processing: set[str] = set()
        self._later: list[tuple[float, int, str]] = []  # (when, tiebreak, key); stale ones skipped
        self._due: dict[str, float] = {}  # key -> when it is queued (its one live entry in _later)
        self._seq = itertools.count()
        self._closed = False
        self._threads: list[threading.Thread] = []

    def add(self, key: str) -> None:
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: str, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            when = self._clock() + delay
            if self._due.get(key, when + 1) <= when:
                return  # queued for an earlier moment already
            self._due[key] = when
            heapq.heappush(self._later, (when, next(self._seq), key))
            self._cond.notify()

    def _add_locked(self, key: str) -> None:
        if self._closed or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:  # else done() queues it
            self._queue.append(key)
            self._cond.notify()

    def _promote_locked(self) -> float | None:
        """Queue the delayed keys that are due; returns seconds until the next one, or None."""
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            when, _, key = heapq.heappop(self._later)
            if self._due.get(key) == when:
                del self._due[key]
                self._add_locked(key)
        return self._later[0][0] - now if self._later else None

    def get(self) -> str | None:
        """The next key to process (it is the caller's until ``done``), or None once closed."""
        with self._cond:
            while True:
                wait = self._promote_locked()
                if self._closed:
                    return None
                if self._queue:
                    key = self._queue.popleft()
                    self._dirty.discard(key)
                    self._processing.add(key)
                    return key
                self._cond.wait(wait)

    def done(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._queue.append(key)
                self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue)

    def waiting(self) -> int:
        """Keys queued for later (each counted once)."""
        with self._cond:
            return len(self._due)

    def start(self, handler: Handler, workers: int, name: str = "sync") -> None:
        """Serve keys with ``workers`` threads calling ``handler(key)``; a handler's exception is
        logged and never stops its thread."""

        def serve() -> None:
            while (key := self.get()) is not None:
                try:
                    handler(key)
                except Exception:
                    log.exception("%s of %s failed", name, key)
                finally:
                    self.done(key)

        for index in range(workers):
            thread = threading.Thread(target=serve, name=f"{name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def alive(self) -> bool:
        """Every worker thread runs (a dead one would leave keys unserved)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
