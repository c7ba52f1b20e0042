"""Who may read what through the agent's public port: the Kubernetes way, as the kubelet does
for its own API. The caller's bearer token goes to a TokenReview (who is it?), the answer to a
SubjectAccessReview (may they ``get`` that subresource of ``virtualmachines``: ``console`` of one
VM, ``stats`` of a namespace's VMs?). The aggregated ``edit`` and ``admin`` roles grant both;
``view`` grants ``stats`` only: console output can say more than the VM's spec (KubeVirt draws
the same line).

Grants are cached for a short while per (token, what), so a client that reconnects does not
cost two API calls each time; denials are not cached."""

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


class CallerAccess:
    def __init__(self, kube: Kube) -> None:
        self.kube = kube
        self._lock = threading.Lock()
        self._granted: dict[tuple[str, str, str, str], float] = {}  # (token, ns, name, what) -> until

    def check(
        self, authorization: str | None, namespace: str, name: str, subresource: str = "console"
    ) -> str:
        """The user allowed to ``get`` ``virtualmachines/<subresource>`` of VM ``name`` (of every
        VM of the namespace when ``name`` is empty), or Denied saying why not. Blocking (two API
        calls at most): call it off the event loop."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Denied(401, "a bearer token is required (kubectl vm sends your kubeconfig's)")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        key = (digest, namespace, name, subresource)
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
                subresource=subresource,
                namespace=namespace,
                name=name,
            )
        except ApiError as exc:
            raise Denied(503, f"cannot check access now: {exc}") from None
        username = str(user.get("username", ""))
        if not allowed:
            detail = f": {reason}" if reason else ""
            of = f'of "{name}" ' if name else "of VMs "
            raise Denied(
                403,
                f"{username} may not get virtualmachines/{subresource} {of}"
                f'in namespace "{namespace}"{detail}',
            )
        with self._lock:
            if len(self._granted) >= CACHE_LIMIT:
                self._granted = {k: v for k, v in self._granted.items() if v > now}
                if len(self._granted) >= CACHE_LIMIT:
                    self._granted.clear()
            self._granted[key] = now + GRANT_SECONDS
        return username
