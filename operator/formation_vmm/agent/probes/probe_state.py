"""Probe results in a row, and what they decide: Kubernetes' rules, which KubeVirt follows.
Pure.

A readiness probe starts failing (not ready until ``successThreshold`` successes in a row) and
turns failing again after ``failureThreshold`` failures in a row; a liveness probe starts
passing and fails after ``failureThreshold`` failures in a row.
"""

from dataclasses import dataclass
from typing import Literal

from formation_vmm.api.models import Probe

ProbeKind = Literal["readiness", "liveness"]


@dataclass
class ProbeRecord:
    kind: ProbeKind
    success_threshold: int = 1
    failure_threshold: int = 3
    successes: int = 0
    failures: int = 0
    passing: bool = False
    ever_passed: bool = False
    message: str = ""
    checks: int = 0

    @classmethod
    def of(cls, kind: ProbeKind, probe: Probe) -> "ProbeRecord":
        # Liveness in Kubernetes needs successThreshold 1; it starts out passing.
        success = 1 if kind == "liveness" else probe.success_threshold
        return cls(kind, success, probe.failure_threshold, passing=kind == "liveness")

    def record(self, ok: bool, message: str) -> bool:
        """Count one result; True when the verdict changed."""
        self.checks += 1
        self.message = message
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.successes, self.failures = 0, self.failures + 1
        before = self.passing
        if ok and self.successes >= self.success_threshold:
            self.passing = True
            self.ever_passed = True
        elif not ok and self.failures >= self.failure_threshold:
            self.passing = False
        return before != self.passing


@dataclass(frozen=True)
class Readiness:
    """What the readiness probe says of a VM's current run, for its status."""

    ready: bool
    ever_ready: bool  # since the domain started: until then the VM is Starting
    reason: str
    message: str


def readiness_of(record: ProbeRecord, what: str) -> Readiness:
    if record.passing:
        return Readiness(True, True, "ReadinessProbeSucceeded", f"{what} answers")
    if record.checks == 0 or (not record.ever_passed and record.failures < record.failure_threshold):
        detail = f": {record.message}" if record.message else ""
        return Readiness(False, record.ever_passed, "ReadinessProbePending", f"waiting for {what}{detail}")
    return Readiness(False, record.ever_passed, "ReadinessProbeFailed", f"{what}: {record.message}")


def describe(probe: Probe) -> str:
    """The probe in words, for conditions and events: 'httpGet :8080/healthz'."""
    if probe.tcp_socket is not None:
        return f"tcpSocket :{probe.tcp_socket.port}"
    if probe.http_get is not None:
        return f"httpGet :{probe.http_get.port}{probe.http_get.path}"
    return "guestAgentPing"
