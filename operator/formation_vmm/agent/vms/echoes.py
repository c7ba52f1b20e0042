"""The lifecycle events our own actions cause, so they do not sync a VM again for nothing.

A sync that defines and starts a domain describes it afterwards and writes what it saw; the
``defined`` and ``started`` events libvirt sends for those calls tell it nothing more, yet each
queued a second sync (a dry-run plan and a libvirt describe: an eighth of an agent's CPU in a
burst). An event is an echo when the same domain was just given the call that causes it; each
expectation is used once and lapses after ``ttl`` seconds, so an echo that never comes cannot
hide a later event of the same kind for long (and events of other kinds, a crash or a guest's
own shutdown, are never taken for echoes).
"""

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

# The lifecycle event (connection.py's names) each of our calls causes.
CAUSED_BY = {
    "define": "defined",
    "start": "started",
    "suspend": "suspended",
    "resume": "resumed",
    "destroy": "stopped",
    "undefine": "undefined",
}


class Echoes:
    def __init__(self, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._expected: defaultdict[str, list[tuple[str, float]]] = defaultdict(list)
        self._lock = threading.Lock()

    def expect(self, domain: str, call: str) -> None:
        """We are about to make ``call`` on ``domain``: its event will be an echo."""
        event = CAUSED_BY.get(call)
        if event is None:
            return
        with self._lock:
            self._expected[domain].append((event, self.clock() + self.ttl))

    @contextlib.contextmanager
    def expecting(self, domain: str, call: str) -> Iterator[None]:
        """Around ``call`` on ``domain``: its event is an echo, unless the call fails."""
        self.expect(domain, call)
        try:
            yield
        except BaseException:
            self.withdraw(domain, call)  # no call, no echo to wait for
            raise

    def withdraw(self, domain: str, call: str) -> None:
        """The call failed: its event will not come."""
        event = CAUSED_BY.get(call)
        with self._lock:
            pending = self._expected.get(domain, [])
            for i in range(len(pending) - 1, -1, -1):
                if pending[i][0] == event:
                    del pending[i]
                    break
            if not pending:
                self._expected.pop(domain, None)

    def is_echo(self, domain: str, event: str) -> bool:
        """True (once) when ``event`` is the echo of a call we made on ``domain``."""
        now = self.clock()
        with self._lock:
            pending = [(e, until) for e, until in self._expected.pop(domain, []) if until > now]
            for i, (expected, _) in enumerate(pending):
                if expected == event:
                    del pending[i]
                    if pending:
                        self._expected[domain] = pending
                    return True
            if pending:
                self._expected[domain] = pending
            return False
