"""Who may do what, asked of the apiserver the Kubernetes way, cached and bounded.

- The agent's ``/metrics`` (``CallerAccess``): the caller's bearer token goes to a TokenReview
  (who is it?), the answer to a SubjectAccessReview (may they ``get`` the non-resource URL
  ``/metrics``?). Its series name every tenant's VMs: it is for Prometheus, bound to the
  ClusterRole ``formation-vmm-metrics-reader`` (as kube-rbac-proxy guards an exporter).
- The controller's aggregated API (``UserAccess``): the apiserver has authenticated the user
  and says who it is (front proxy); a SubjectAccessReview asks whether they may ``get``
  ``virtualmachines/console`` or ``virtualmachines/stats`` of a VM in our subresources group.
  The apiserver authorised the request already; this is the aggregated server's own check, as
  every aggregated API server makes.

Anyone who reaches a port can send a request, and each would be API calls: so answers are
cached per (who, what), grants for 30 s and denials for 10 s (a client retrying costs nothing
more), the reviews run on two threads of their own (never the executor the heartbeat and the
health checks use), and at most ``MAX_WAITING`` checks wait for them: past that a request is
refused at once with 429, before any API call."""

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from formation_vmm.api.names import SUBRESOURCES_GROUP, VM_PLURAL
from formation_vmm.kube import ApiError, Body, Kube

GRANT_SECONDS = 30.0
DENIAL_SECONDS = 10.0
CACHE_LIMIT = 1024
REVIEW_THREADS = 2
MAX_WAITING = 32


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # 401: who are you; 403: not you; 429: too many; 503: cannot tell now
        self.message = message


@dataclass(frozen=True)
class Ask:
    """What a caller wants to ``get``: a subresource of one VM, or a non-resource URL (``path``)."""

    namespace: str = ""
    name: str = ""
    subresource: str = ""
    path: str = ""

    def refusal(self, username: str, reason: str) -> str:
        detail = f": {reason}" if reason else ""
        if self.path:
            return f"{username} may not get {self.path}{detail}"
        return (
            f'{username} may not get virtualmachines/{self.subresource} of "{self.name}" '
            f'in namespace "{self.namespace}"{detail}'
        )


class Reviews:
    """The cache, the threads and the bound every kind of check shares."""

    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._lock = threading.Lock()
        self._granted: dict[tuple[str, Ask], float] = {}  # (who digest, what) -> until
        self._denied: dict[tuple[str, Ask], tuple[float, Denied]] = {}
        self._pool = ThreadPoolExecutor(REVIEW_THREADS, thread_name_prefix="access-review")
        self._waiting = 0  # checks handed to the pool and not answered yet (the event loop's)

    async def decide(self, who: str, ask: Ask, review: Callable[[], str]) -> str:
        """``review()`` (the user allowed, or Denied) on the reviews' own threads, cached per
        (``who``, ``ask``); refused with 429 when too many wait already."""
        if self._waiting >= MAX_WAITING:
            raise Denied(429, "too many access checks wait; try again in a moment")
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._cached, who, ask, review)
        finally:
            self._waiting -= 1

    def _cached(self, who: str, ask: Ask, review: Callable[[], str]) -> str:
        key = (hashlib.sha256(who.encode()).hexdigest(), ask)
        now = time.monotonic()
        with self._lock:
            if self._granted.get(key, 0.0) > now:
                return "(cached)"
            until, denial = self._denied.get(key, (0.0, None))
            if denial is not None and until > now:
                raise denial
        try:
            username = review()
        except Denied as denied:
            if denied.status in (401, 403):  # not "cannot tell now": that is asked again
                with self._lock:
                    _bound(self._denied, now, lambda entry: entry[0])
                    self._denied[key] = (now + DENIAL_SECONDS, denied)
            raise
        with self._lock:
            _bound(self._granted, now, lambda until: until)
            self._granted[key] = now + GRANT_SECONDS
        return username

    def allowed(self, user: Body, ask: Ask) -> str:
        """The username when ``user`` may get what ``ask`` says, else Denied (one API call)."""
        try:
            if ask.path:
                allowed, reason = self.kube.review_path(user, verb="get", path=ask.path)
            else:
                allowed, reason = self.kube.review_access(
                    user,
                    verb="get",
                    group=SUBRESOURCES_GROUP,
                    resource=VM_PLURAL,
                    subresource=ask.subresource,
                    namespace=ask.namespace,
                    name=ask.name,
                )
        except ApiError as exc:
            raise Denied(503, f"cannot check access now: {exc}") from None
        username = str(user.get("username", ""))
        if not allowed:
            raise Denied(403, ask.refusal(username, reason))
        return username


class CallerAccess:
    """Bearer-token callers (Prometheus at ``/metrics``)."""

    def __init__(self, kube: Kube) -> None:
        self.reviews = Reviews(kube)

    async def metrics_refusal(self, authorization: str | None) -> tuple[int, str] | None:
        """Why the caller may not read ``/metrics`` (HTTP status, message), or None."""
        ask = Ask(path="/metrics")
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        try:
            if scheme.lower() != "bearer" or not token:
                raise Denied(401, "a bearer token is required")
            await self.reviews.decide(token, ask, lambda: self._review(token, ask))
        except Denied as denied:
            return denied.status, denied.message
        return None

    def _review(self, token: str, ask: Ask) -> str:
        try:
            user = self.reviews.kube.review_token(token)
        except ApiError as exc:
            raise Denied(503, f"cannot check the token now: {exc}") from None
        if user is None:
            raise Denied(401, "the token is not valid for this cluster")
        return self.reviews.allowed(user, ask)


class UserAccess:
    """Users the apiserver authenticated and names (the front proxy's headers)."""

    def __init__(self, kube: Kube) -> None:
        self.reviews = Reviews(kube)

    async def check(self, user: Body, ask: Ask) -> str:
        who = json.dumps(user, sort_keys=True)
        return await self.reviews.decide(who, ask, lambda: self.reviews.allowed(user, ask))


def _bound(cache: dict[Any, Any], now: float, until: Callable[[Any], float]) -> None:
    """Keep ``cache`` under CACHE_LIMIT entries: the expired go first, then all (a flood of
    distinct tokens must not grow the agent's memory)."""
    if len(cache) < CACHE_LIMIT:
        return
    for key in [k for k, v in cache.items() if until(v) <= now]:
        del cache[key]
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
