"""Who may read a VM's console through the agent: the Kubernetes way, as the kubelet does for
its own API. The caller's bearer token goes to a TokenReview (who is it?), the answer to a
SubjectAccessReview (may they ``get`` ``virtualmachines/console`` of that VM?). The aggregated
``edit`` and ``admin`` roles grant it, as KubeVirt's do for its console: console output can say
more than the VM's spec, so ``view`` does not.

Answers are cached for a short while per (token, VM), so a client that reconnects does not cost
two API calls each time; a denial is never cached longer than a grant."""

import hashlib
import threading
import time

from formation_vmm.api.names import GROUP, VM_PLURAL
from formation_vmm.kube import ApiError, Kube

GRANT_SECONDS = 30.0
CACHE_LIMIT = 1024


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status  # 401: who are you; 403: not you; 503: cannot tell now
        self.message = message


class ConsoleAccess:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._lock = threading.Lock()
        self._granted: dict[tuple[str, str, str], float] = {}  # (token digest, ns, name) -> until

    def check(self, authorization: str | None, namespace: str, name: str) -> str:
        """The user allowed to read this VM's console, or Denied saying why not. Blocking (two
        API calls at most): call it off the event loop."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Denied(401, "a bearer token is required (kubectl vm console sends your kubeconfig's)")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        key = (digest, namespace, name)
        now = time.monotonic()
        with self._lock:
            if self._granted.get(key, 0.0) > now:
                return "(cached)"
        try:
            user = self.kube.review_token(token.strip())
        except ApiError as exc:
            raise Denied(503, f"cannot check the token now: {exc}") from None
        if user is None:
            raise Denied(401, "the token is not valid for this cluster")
        try:
            allowed, reason = self.kube.review_access(
                user,
                verb="get",
                group=GROUP,
                resource=VM_PLURAL,
                subresource="console",
                namespace=namespace,
                name=name,
            )
        except ApiError as exc:
            raise Denied(503, f"cannot check access now: {exc}") from None
        username = str(user.get("username", ""))
        if not allowed:
            detail = f": {reason}" if reason else ""
            raise Denied(
                403,
                f'{username} may not get virtualmachines/console of "{name}" '
                f'in namespace "{namespace}"{detail}',
            )
        with self._lock:
            if len(self._granted) >= CACHE_LIMIT:
                self._granted = {k: v for k, v in self._granted.items() if v > now}
                if len(self._granted) >= CACHE_LIMIT:
                    self._granted.clear()
            self._granted[key] = now + GRANT_SECONDS
        return username
