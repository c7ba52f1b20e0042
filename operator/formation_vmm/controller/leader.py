"""Leader election over a coordination.k8s.io Lease, as client-go's leaderelection does: two
controller replicas run, one acts. The leader renews the lease every ``renew`` seconds; a standby
takes it over once it has not been renewed for ``duration`` seconds. Renewals go through the API
with the lease's resourceVersion, so two replicas never both believe they lead after a race.
The decision is pure (``decide``); ``LeaderElector`` does the I/O."""

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

from formation_vmm.kube import ApiError, ConflictError, Kube

log = logging.getLogger(__name__)


class Move(Enum):
    CREATE = "create"
    RENEW = "renew"
    TAKE_OVER = "take-over"
    WAIT = "wait"


@dataclass(frozen=True)
class LeaseView:
    holder: str | None
    renewed: datetime | None
    duration: float


def decide(lease: LeaseView | None, me: str, now: datetime) -> Move:
    if lease is None:
        return Move.CREATE
    if lease.holder == me:
        return Move.RENEW
    if (
        lease.holder is None
        or lease.renewed is None
        or now - lease.renewed > timedelta(seconds=lease.duration)
    ):
        return Move.TAKE_OVER
    return Move.WAIT


def _micro(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def view_of(body: dict[str, Any]) -> LeaseView:
    spec = body.get("spec") or {}
    renewed = spec.get("renewTime")
    moment = None
    if isinstance(renewed, datetime):
        moment = renewed if renewed.tzinfo else renewed.replace(tzinfo=UTC)
    elif isinstance(renewed, str):
        moment = datetime.fromisoformat(renewed.replace("Z", "+00:00"))
    return LeaseView(spec.get("holderIdentity"), moment, float(spec.get("leaseDurationSeconds") or 15))


class LeaderElector:
    def __init__(
        self, kube: Kube, namespace: str, name: str, identity: str, duration: float = 15.0, renew: float = 5.0
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew = renew
        self._leading = threading.Event()
        self._last_renewal = 0.0
        self.last_written: str | None = None  # the renewTime we last wrote, for the watch pulse

    def is_leader(self) -> bool:
        """Leading, and the last renewal is recent enough that no standby can have taken over."""
        return self._leading.is_set() and time.monotonic() - self._last_renewal < self.duration

    def step(self) -> bool:
        """One round: create, renew, take over, or wait. Returns whether we lead."""
        now = datetime.now(UTC)
        body = self.kube.lease(self.namespace, self.name)
        move = decide(view_of(body) if body else None, self.identity, now)
        if move is Move.WAIT:
            self._lose("another replica holds the lease")
            return False
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.duration),
            "renewTime": _micro(now),
        }
        try:
            if move is Move.CREATE:
                spec["acquireTime"] = _micro(now)
                self.kube.create_lease(
                    self.namespace,
                    {"metadata": {"name": self.name, "namespace": self.namespace}, "spec": spec},
                )
            else:
                assert body is not None
                old = dict(body.get("spec") or {})
                if move is Move.TAKE_OVER:
                    spec["acquireTime"] = _micro(now)
                    spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
                    log.info("taking over the lease from %s", old.get("holderIdentity"))
                merged = {k: v for k, v in old.items() if v is not None} | spec
                meta = {"name": self.name, "namespace": self.namespace}
                meta["resourceVersion"] = body["metadata"]["resourceVersion"]
                self.kube.replace_lease(self.namespace, self.name, {"metadata": meta, "spec": merged})
        except ConflictError:
            self._lose("the lease changed under us")
            return False
        except ApiError as exc:
            self._lose(f"cannot write the lease: {exc}")
            return False
        self.last_written = spec["renewTime"]
        self._last_renewal = time.monotonic()
        if not self._leading.is_set():
            log.info("leading as %s (lease %s/%s)", self.identity, self.namespace, self.name)
            self._leading.set()
        return True

    def _lose(self, why: str) -> None:
        if self._leading.is_set():
            log.warning("no longer leading: %s", why)
            self._leading.clear()
