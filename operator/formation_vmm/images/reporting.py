"""Status reports of image imports, written by a thread of their own: an import never waits on
the API, and a burst of progress for one image collapses to its latest report."""

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class LatestReporter:
    def __init__(self, report: Callable[..., None], name: str = "image-status") -> None:
        self._report = report
        self._cond = threading.Condition()
        self._pending: OrderedDict[Any, tuple[Any, ...]] = OrderedDict()
        self._closed = False
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def submit(self, key: Any, *args: Any) -> None:
        """Report ``args`` for ``key`` soon; a report not yet written for the same key is dropped."""
        with self._cond:
            self._pending.pop(key, None)
            self._pending[key] = args
            self._cond.notify()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, args = self._pending.popitem(last=False)
            try:
                self._report(*args)
            except Exception:  # best effort: the next change writes it again
                log.exception("cannot write an image's status")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
