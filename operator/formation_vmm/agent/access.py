"""Who may read what through the agent's public port: the Kubernetes way, as the kubelet does
for its own API. The caller's bearer token goes to a TokenReview (who is it?), the answer to a
SubjectAccessReview (may they ``get`` that subresource of ``virtualmachines``: ``console`` of one
VM, ``stats`` of a namespace's VMs? may they ``get`` the non-resource URL ``/metrics``?). The
aggregated ``edit`` and ``admin`` roles grant console and stats; ``view`` grants ``stats`` only:
console output can say more than the VM's spec (KubeVirt draws the same line). ``/metrics``
names every tenant's VMs: it is for Prometheus, bound to the ClusterRole
``formation-vmm-metrics-reader`` (as kube-rbac-proxy guards an exporter).

Anyone who reaches the port can send a request, and each would be API calls: so answers are
cached per (token, what), grants for 30 s and denials for 10 s (a client retrying a bad token
costs nothing more), the reviews run on two threads of their own (never the executor the
heartbeat and the health checks use), and at most ``MAX_WAITING`` checks wait for them: past
that a request is refused at once with 429, before any API call."""

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from formation_vmm.api.names import GROUP, VM_PLURAL
from formation_vmm.kube import ApiError, Kube

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
    """What a caller wants to ``get``: a subresource of one VM (of every VM of the namespace
    when ``name`` is empty), or a non-resource URL (``path``)."""

    namespace: str = ""
    name: str = ""
    subresource: str = ""
    path: str = ""

    def refusal(self, username: str, reason: str) -> str:
        detail = f": {reason}" if reason else ""
        if self.path:
            return f"{username} may not get {self.path}{detail}"
        of = f'of "{self.name}" ' if self.name else "of VMs "
        return (
            f"{username} may not get virtualmachines/{self.subresource} {of}"
            f'in namespace "{self.namespace}"{detail}'
        )


class CallerAccess:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._lock = threading.Lock()
        self._granted: dict[tuple[str, Ask], float] = {}  # (token digest, what) -> until
        self._denied: dict[tuple[str, Ask], tuple[float, Denied]] = {}
        self._pool = ThreadPoolExecutor(REVIEW_THREADS, thread_name_prefix="access-review")
        self._waiting = 0  # checks handed to the pool and not answered yet (the event loop's)

    async def acheck(
        self, authorization: str | None, namespace: str, name: str, subresource: str = "console"
    ) -> str:
        """check(), from the event loop."""
        return await self._off_loop(authorization, Ask(namespace, name, subresource))

    async def metrics_refusal(self, authorization: str | None) -> tuple[int, str] | None:
        """Why the caller may not read ``/metrics`` (HTTP status, message), or None."""
        try:
            await self._off_loop(authorization, Ask(path="/metrics"))
        except Denied as denied:
            return denied.status, denied.message
        return None

    async def _off_loop(self, authorization: str | None, ask: Ask) -> str:
        """On the reviews' own threads; refused with 429 when too many wait already."""
        if self._waiting >= MAX_WAITING:
            raise Denied(429, "too many access checks wait on this node; try again in a moment")
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self.asked, authorization, ask)
        finally:
            self._waiting -= 1

    def check(
        self, authorization: str | None, namespace: str, name: str, subresource: str = "console"
    ) -> str:
        """The user allowed to ``get`` ``virtualmachines/<subresource>`` of VM ``name`` (of every
        VM of the namespace when ``name`` is empty), or Denied saying why not. Blocking (two API
        calls at most): call it off the event loop."""
        return self.asked(authorization, Ask(namespace, name, subresource))

    def asked(self, authorization: str | None, ask: Ask) -> str:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Denied(401, "a bearer token is required (kubectl vm sends your kubeconfig's)")
        key = (hashlib.sha256(token.strip().encode()).hexdigest(), ask)
        now = time.monotonic()
        with self._lock:
            if self._granted.get(key, 0.0) > now:
                return "(cached)"
            until, denial = self._denied.get(key, (0.0, None))
            if denial is not None and until > now:
                raise denial
        try:
            username = self._review(token.strip(), ask)
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

    def _review(self, token: str, ask: Ask) -> str:
        try:
            user = self.kube.review_token(token)
        except ApiError as exc:
            raise Denied(503, f"cannot check the token now: {exc}") from None
        if user is None:
            raise Denied(401, "the token is not valid for this cluster")
        try:
            if ask.path:
                allowed, reason = self.kube.review_path(user, verb="get", path=ask.path)
            else:
                allowed, reason = self.kube.review_access(
                    user,
                    verb="get",
                    group=GROUP,
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


def _bound(cache: dict[Any, Any], now: float, until: Callable[[Any], float]) -> None:
    """Keep ``cache`` under CACHE_LIMIT entries: the expired go first, then all (a flood of
    distinct tokens must not grow the agent's memory)."""
    if len(cache) < CACHE_LIMIT:
        return
    for key in [k for k, v in cache.items() if until(v) <= now]:
        del cache[key]
    if len(cache) >= CACHE_LIMIT:
        cache.clear()
