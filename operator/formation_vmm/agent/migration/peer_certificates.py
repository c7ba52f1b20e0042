"""The relay certificates other nodes publish on their Node, as the relay's handshakes ask for
them. A source names its node in the clear before TLS, so anyone who reaches the relay's port
could make each connection a Node GET: a certificate is kept for ``fresh`` seconds, no
certificate (no such node, or it publishes none yet) for ``retry`` seconds, and lookups of
all nodes together are limited to ``per_second`` (a token bucket), whatever names a flood
of connections sends. Past that, the last answer stands (none for a node never seen)."""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Lookup = Callable[[str], "str | None"]


@dataclass
class _Known:
    certificate: str | None
    fetched: float  # when the answer came
    tried: float  # when a lookup last started


class PeerCertificates:
    def __init__(
        self,
        lookup: Lookup,
        clock: Callable[[], float] = time.monotonic,
        fresh: float = 60.0,
        retry: float = 5.0,
        per_second: float = 5.0,
        limit: int = 1024,
    ) -> None:
        self.lookup = lookup
        self.clock = clock
        self.fresh, self.retry, self.per_second, self.limit = fresh, retry, per_second, limit
        self._lock = threading.Lock()
        self._known: dict[str, _Known] = {}
        self._tokens = per_second
        self._refilled = clock()

    def __call__(self, node: str) -> str | None:
        now = self.clock()
        with self._lock:
            known = self._known.get(node)
            if known is not None and (
                (known.certificate is not None and now - known.fetched < self.fresh)
                or now - known.tried < self.retry
            ):
                return known.certificate
            if not self._take(now):
                return known.certificate if known is not None else None
            if known is None:
                if len(self._known) >= self.limit:
                    self._known.clear()  # names a flood sent: the real peers are looked up again
                known = self._known[node] = _Known(None, float("-inf"), now)
            known.tried = now
        certificate = self.lookup(node)
        with self._lock:
            known.certificate, known.fetched = certificate, self.clock()
        return certificate

    def _take(self, now: float) -> bool:
        self._tokens = min(self.per_second, self._tokens + (now - self._refilled) * self.per_second)
        self._refilled = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
