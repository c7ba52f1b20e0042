"""The agent's one work queue, as client-go's workqueue: whatever asks for work (a watch event,
libvirt's events, a retry, a deadline, the periodic resync) only queues a key, and the queue's
workers do the work. A key is a kind's lane and a name in it (a VM's domain, a VmMigration's
namespace/name); each lane has workers of its own, so a migration's copy that lasts minutes
never holds a VM's sync back.

- A key queued many times is worked on once; never by two workers at once (queued again while
  it is worked on, it runs once more afterwards).
- A key may be queued for later, and waits for at most one such moment (the earliest asked
  for), so retries asked for again and again do not pile up.
- The work returns when to look at the key again (or None); work that raises is logged and
  retried after a back-off that doubles with each failure of that key in a row.
- One set of metrics for every kind: depth, wait, work time, retries."""

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from formation_vmm import metrics

log = logging.getLogger(__name__)

# One key's work: returns seconds until the key is looked at again, or None.
Work = Callable[[str], float | None]
Key = tuple[str, str]  # (kind, name)

FIRST_BACKOFF_SECONDS = 1.0
MAX_BACKOFF_SECONDS = 60.0


@dataclass
class _Lane:
    ready: deque[str] = field(default_factory=deque)
    threads: list[threading.Thread] = field(default_factory=list)


class WorkQueue:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        first_backoff: float = FIRST_BACKOFF_SECONDS,
        max_backoff: float = MAX_BACKOFF_SECONDS,
    ) -> None:
        self._clock = clock
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._cond = threading.Condition()
        self._lanes: dict[str, _Lane] = {}
        self._dirty: dict[Key, float] = {}  # queued, not yet taken -> since when (ready)
        self._processing: set[Key] = set()
        self._later: list[tuple[float, int, Key]] = []  # (when, tiebreak, key); stale ones skipped
        self._due: dict[Key, float] = {}  # key -> when it is queued (its one live entry in _later)
        self._failures: dict[Key, int] = {}  # failures in a row
        self._seq = itertools.count()
        self._closed = False

    def lane(self, kind: str) -> "Lane":
        """What a kind's producers hold: add and add_after of names of that kind."""
        with self._cond:
            self._lane(kind)
        return Lane(self, kind)

    # --- producers -----------------------------------------------------------------------------

    def add(self, kind: str, name: str) -> None:
        with self._cond:
            self._add_locked((kind, name))

    def add_after(self, kind: str, name: str, delay: float) -> None:
        if delay <= 0:
            self.add(kind, name)
            return
        key = (kind, name)
        with self._cond:
            when = self._clock() + delay
            if self._due.get(key, when + 1) <= when:
                return  # queued for an earlier moment already
            self._due[key] = when
            heapq.heappush(self._later, (when, next(self._seq), key))
            self._cond.notify_all()

    def _add_locked(self, key: Key) -> None:
        if self._closed or key in self._dirty:
            return
        self._dirty[key] = self._clock()
        if key not in self._processing:  # else done() queues it
            self._lane(key[0]).ready.append(key[1])
            self._depth_changed(key[0])
            self._cond.notify_all()

    def _lane(self, kind: str) -> _Lane:
        return self._lanes.setdefault(kind, _Lane())

    def _depth_changed(self, kind: str) -> None:
        metrics.QUEUE_DEPTH.labels(kind).set(len(self._lanes[kind].ready))

    def _promote_locked(self) -> float | None:
        """Queue the delayed keys that are due; returns seconds until the next one, or None."""
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            when, _, key = heapq.heappop(self._later)
            if self._due.get(key) == when:
                del self._due[key]
                self._add_locked(key)
        return self._later[0][0] - now if self._later else None

    # --- workers -------------------------------------------------------------------------------

    def get(self, kind: str) -> str | None:
        """The next name of ``kind`` to work on (the caller's until ``done``), or None once
        closed."""
        with self._cond:
            ready = self._lane(kind).ready
            while True:
                wait = self._promote_locked()
                if self._closed:
                    return None
                if ready:
                    name = ready.popleft()
                    key = (kind, name)
                    since = self._dirty.pop(key, self._clock())
                    self._processing.add(key)
                    self._depth_changed(kind)
                    metrics.QUEUE_WAIT_SECONDS.labels(kind).observe(max(self._clock() - since, 0.0))
                    return name
                self._cond.wait(wait)

    def done(self, kind: str, name: str, again: float | None = None, failed: bool = False) -> None:
        """The work on a key ended: ``again`` seconds later it is looked at again (if asked);
        ``failed``: it raised, and is retried after its back-off."""
        key = (kind, name)
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._lane(kind).ready.append(name)
                self._depth_changed(kind)
                self._cond.notify_all()
            if failed:
                count = self._failures[key] = self._failures.get(key, 0) + 1
                again = min(self._first_backoff * 2 ** (count - 1), self._max_backoff)
            else:
                self._failures.pop(key, None)
        if again is not None:
            metrics.QUEUE_RETRIES.labels(kind, "failed" if failed else "asked").inc()
            self.add_after(kind, name, again)

    def start(self, kind: str, work: Work, workers: int) -> None:
        """Serve ``kind``'s keys with ``workers`` threads; an exception is logged, the key is
        retried after its back-off, and the thread goes on."""

        def serve() -> None:
            while (name := self.get(kind)) is not None:
                began = self._clock()
                again, failed = None, False
                try:
                    again = work(name)
                except Exception:
                    log.exception("%s %s failed", kind, name)
                    failed = True
                finally:
                    metrics.QUEUE_WORK_SECONDS.labels(kind).observe(max(self._clock() - began, 0.0))
                    self.done(kind, name, again, failed)

        lane = self._lane(kind)
        for index in range(workers):
            thread = threading.Thread(target=serve, name=f"{kind}-{index}", daemon=True)
            thread.start()
            lane.threads.append(thread)

    def alive(self) -> bool:
        """Every lane's workers run (a dead one would leave keys unserved)."""
        threads = [t for lane in self._lanes.values() for t in lane.threads]
        return bool(threads) and all(t.is_alive() for t in threads)

    def depth(self, kind: str) -> int:
        with self._cond:
            lane = self._lanes.get(kind)
            return len(lane.ready) if lane is not None else 0

    def waiting(self, kind: str) -> int:
        """Keys of ``kind`` queued for later (each counted once)."""
        with self._cond:
            return sum(1 for key in self._due if key[0] == kind)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class Lane:
    """One kind's names in the queue."""

    def __init__(self, queue: WorkQueue, kind: str) -> None:
        self.queue = queue
        self.kind = kind

    def add(self, name: str) -> None:
        self.queue.add(self.kind, name)

    def add_after(self, name: str, delay: float) -> None:
        self.queue.add_after(self.kind, name, delay)

    def __len__(self) -> int:
        return self.queue.depth(self.kind)

    def waiting(self) -> int:
        return self.queue.waiting(self.kind)
