"""Fixtures: a real control plane (etcd, kube-apiserver, kube-controller-manager) for the whole
session, the CRDs installed from crds/, one namespace per test. The binaries are built if this
machine has none yet (hack/control-plane-bins.sh, cached outside the clone); nothing is skipped."""

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from formation_vmm.devcluster.cluster import Kubectl, install_crds
from formation_vmm.devcluster.controlplane import ControlPlane
from tests.support.binaries import binaries


@contextlib.contextmanager
def private_plane(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[ControlPlane]:
    """A control plane of a test module's own, for tests that would disturb the shared one (or
    be disturbed by its controller)."""
    plane = ControlPlane(tmp_path_factory.mktemp(name), binaries())
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), binaries())
    open_to_qemu(plane.root)
    started = time.monotonic()
    plane.start()
    print(f"control plane ready in {time.monotonic() - started:.1f}s")
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubectl(control_plane: ControlPlane) -> Kubectl:
    k = Kubectl(control_plane.binaries() / "kubectl", control_plane.kubeconfig)
    install_crds(k)
    return k


@pytest.fixture
def ns(kubectl: Kubectl) -> Iterator[str]:
    """A namespace whose VMs are deleted, and their domains with them, before the next test."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "vm", "--all", "-n", name, "--wait=true", "--timeout=60s", check=False)
    kubectl("delete", "namespace", name, "--wait=false", check=False)


def open_to_qemu(path: Path) -> None:
    """Let any user through ``path`` and the directories above it under /tmp (o+x, not o+r):
    each VM's QEMU runs as a uid of its own and must reach its files, and pytest's and
    mkdtemp's directories are 0700 (the agent would otherwise run QEMU as the node's user, and
    the tests would not see the per-VM uids; run.py says so at start)."""
    for directory in [path, *path.parents]:
        if directory == Path("/tmp") or Path("/tmp") not in directory.parents:
            break
        directory.chmod(directory.stat().st_mode | 0o001)
