"""A pool of import threads shared fairly between namespaces: each namespace may have at most
``per_namespace`` imports running, and waiting namespaces take turns, so one tenant's slow or
many downloads never hold every slot while another's wait."""

import threading
from collections import OrderedDict, deque
from collections.abc import Callable

Job = Callable[[], None]


class FairPool:
    def __init__(self, workers: int, per_namespace: int, name: str = "image-import") -> None:
        self.per_namespace = max(1, per_namespace)
        self._cond = threading.Condition()
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # namespace -> waiting jobs
        self._running: dict[str, int] = {}
        self._closed = False
        for index in range(workers):
            threading.Thread(target=self._serve, name=f"{name}-{index}", daemon=True).start()

    def submit(self, namespace: str, job: Job) -> None:
        with self._cond:
            self._queues.setdefault(namespace, deque()).append(job)
            self._cond.notify()

    def _take(self) -> tuple[str, Job] | None:
        """The next job of the first namespace (in turn order) under its share; that namespace
        goes to the back of the turn order."""
        for namespace, jobs in self._queues.items():
            if jobs and self._running.get(namespace, 0) < self.per_namespace:
                job = jobs.popleft()
                self._queues.move_to_end(namespace)
                if not jobs:
                    del self._queues[namespace]
                self._running[namespace] = self._running.get(namespace, 0) + 1
                return namespace, job
        return None

    def _serve(self) -> None:
        while True:
            with self._cond:
                taken = self._take()
                while taken is None:
                    if self._closed:
                        return
                    self._cond.wait()
                    taken = self._take()
            namespace, job = taken
            try:
                job()
            finally:
                with self._cond:
                    self._running[namespace] -= 1
                    self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queues.clear()
            self._cond.notify_all()
