import json
import subprocess
import sys
from pathlib import Path

import pytest

from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.processes import ProcessTable, alive, spawn, start_time

pytestmark = pytest.mark.controlplane


def test_a_recycled_pid_is_never_signalled(tmp_path: Path) -> None:
    # A process we did not start, recorded under a stale start time, as after a reboot.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / "pids.json"
        path.write_text(json.dumps({"old": {"pid": bystander.pid, "start": 1}}))
        table = ProcessTable(path)
        assert table.read() == {}
        table.stop_all()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_all_kills_the_whole_group(tmp_path: Path) -> None:
    table = ProcessTable(tmp_path / "pids.json")
    sleeper = "import time; time.sleep(60)"
    script = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleeper!r}]); {sleeper}"
    pid = spawn([sys.executable, "-c", script], tmp_path / "log")
    table.add("parent", pid)
    assert start_time(pid) is not None
    table.stop_all()
    assert not alive(pid)
    out = subprocess.run(["pgrep", "-g", str(pid)], capture_output=True, text=True, check=False)
    assert out.stdout.strip() == ""


def test_control_plane_stops_without_leftovers(tmp_path: Path) -> None:
    plane = ControlPlane(tmp_path / "cp")
    plane.start()
    pids = plane.processes.read()
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
    assert plane.running()
    plane.stop()
    assert not any(alive(pid) for pid in pids.values())
    assert not plane.running()
