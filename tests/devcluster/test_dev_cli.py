"""`vmm dev up|status|down` as a user runs them: a second `up` is harmless, `down` leaves no
process behind, and `up` after a crash (processes killed, state left) works."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.processes import alive

pytestmark = pytest.mark.controlplane


def vmm(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "formation_vmm.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def dev_env(tmp_path: Path) -> dict[str, str]:
    # test:/// keeps this test independent of libvirtd; the real-guest path is tested elsewhere.
    return {**os.environ, "VMM_DEV_DIR": str(tmp_path / "dev"), "VMM_LIBVIRT_URI": "test:///default"}


def test_up_status_up_again_down(dev_env: dict[str, str]) -> None:
    root = Path(dev_env["VMM_DEV_DIR"])
    try:
        up = vmm(dev_env, "dev", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export KUBECONFIG={root / 'kubeconfig'}" in up.stdout
        assert "sample" in up.stdout and "Running" in up.stdout
        header = next(line for line in up.stdout.splitlines() if line.startswith("NAMESPACE"))
        assert header.split() == [
            "NAMESPACE",
            "NAME",
            "PHASE",
            "NODE",
            "IP",
            "CPUS",
            "MEMORY",
            "READY",
            "AGE",
        ]

        pids = ControlPlane(root).processes.read()
        assert set(pids) >= {"etcd", "kube-apiserver", "kube-controller-manager", "controller"}

        status = vmm(dev_env, "dev", "status")
        assert status.returncode == 0 and "sample" in status.stdout

        again = vmm(dev_env, "dev", "up")
        assert again.returncode == 0 and "already running" in again.stdout
        assert ControlPlane(root).processes.read() == pids  # nothing restarted, nothing doubled

        down = vmm(dev_env, "dev", "down")
        assert down.returncode == 0
        assert not any(alive(pid) for pid in pids.values())
        assert vmm(dev_env, "dev", "status").returncode == 1
    finally:
        vmm(dev_env, "dev", "down")


def test_up_after_a_crash(dev_env: dict[str, str]) -> None:
    root = Path(dev_env["VMM_DEV_DIR"])
    try:
        assert vmm(dev_env, "dev", "up", "--no-sample").returncode == 0
        old = ControlPlane(root).processes.read()
        for pid in old.values():  # a crash: everything dies, the state files stay
            os.killpg(pid, signal.SIGKILL)
        up = vmm(dev_env, "dev", "up", "--no-sample")
        assert up.returncode == 0, up.stdout + up.stderr
        new = ControlPlane(root).processes.read()
        assert all(alive(pid) for pid in new.values())
        assert set(new.values()).isdisjoint(old.values())
    finally:
        vmm(dev_env, "dev", "down")
