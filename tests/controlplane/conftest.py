"""A real control plane (etcd, kube-apiserver, kube-controller-manager) for the whole session,
the CRDs installed from crds/, one namespace per test. A missing binary fails, never skips."""

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from formation_vmm.devcluster.cluster import Kubectl, install_crds
from formation_vmm.devcluster.controlplane import ControlPlane, find_binaries


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    started = time.monotonic()
    plane.start()
    print(f"control plane ready in {time.monotonic() - started:.1f}s")
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    k = Kubectl(find_binaries() / "kubectl", control_plane.kubeconfig)
    install_crds(k)
    return k


@pytest.fixture
def namespace(kubectl: Kubectl) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def get_json(kubectl: Kubectl, *args: str) -> dict[str, Any]:
    return json.loads(kubectl("get", *args, "-o", "json"))


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll until ``predicate`` returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@pytest.fixture
def logs_on_failure(control_plane: ControlPlane, request: pytest.FixtureRequest) -> Iterator[Path]:
    yield control_plane.logs
