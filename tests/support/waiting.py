"""Waiting for a condition, and reading objects through kubectl."""

import json
import time
from collections.abc import Callable
from typing import Any

from formation_vmm.devcluster.cluster import Kubectl


def get_json(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    return json.loads(kubectl("get", *args, "-o", "json"))  # type: ignore[no-any-return]


def get_json_or_none(kubectl: Kubectl, *args: str) -> dict[str, Any] | None:
    """The object, or None when kubectl says it is not there."""
    proc = kubectl.run("get", *args, "-o", "json")
    if proc.returncode != 0:
        if "NotFound" in proc.stderr or "not found" in proc.stderr:
            return None
        raise RuntimeError(f"kubectl get {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``.
    An exception the predicate raises is a failure of the test, not a reason to keep waiting."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
