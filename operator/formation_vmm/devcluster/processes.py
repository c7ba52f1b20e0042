"""Background processes that outlive the command that started them, recorded in a state file so
another command (``vmm dev down``, a test's teardown) can stop them and leave nothing behind."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port free right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start ``argv`` in its own session (so it survives us and can be stopped as a group)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(  # noqa: S603 - argv built by this package, no shell
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    return proc.pid


def alive(pid: int) -> bool:
    """Whether ``pid`` runs. A zombie does not: its parent may be gone and PID 1 in a sandbox
    may never reap it, so it can linger after the process itself is long dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        if done == pid:
            return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state is the first field after the parenthesised command name.
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL whatever is left after ``timeout``
    (with no timeout: SIGKILL at once)."""
    # After SIGKILL, wait a little for the kernel to reap it, so callers see it gone.
    steps = [(signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)] if timeout > 0 else [(signal.SIGKILL, 5.0)]
    for sig, wait in steps:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None if there is no such
    process. With the pid it names one process for good: pids are reused, start times are not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[-1].split()[19])


class ProcessTable:
    """name -> pid, kept in a JSON file beside the processes' logs.

    Each entry also records the process's start time, so a stale file (after a reboot, or
    long after a crash) never makes us signal an unrelated process that got the same pid.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _entries(self) -> dict[str, dict[str, int | None]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}

    def read(self) -> dict[str, int]:
        """The recorded processes that are still the ones we started (dead ones included, as
        long as their pid was not reused)."""
        table = {}
        for name, entry in self._entries().items():
            pid = int(entry["pid"] or 0)
            now = start_time(pid)
            if now is None or now == entry.get("start"):
                table[name] = pid
        return table

    def add(self, name: str, pid: int) -> None:
        table = self._entries()
        table[name] = {"pid": pid, "start": start_time(pid)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        os.replace(tmp, self.path)

    def forget(self, name: str) -> None:
        """Stop recording ``name`` (a process stopped on purpose, that nothing is to wait for)."""
        table = self._entries()
        if table.pop(name, None) is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        os.replace(tmp, self.path)

    def stop_all(self) -> None:
        """Stop every recorded process, newest first, and forget them."""
        for pid in reversed(list(self.read().values())):
            stop(pid)
        self.path.unlink(missing_ok=True)


def netns_argv(netns: str, argv: "tuple[str, ...] | list[str]") -> list[str]:
    """``argv`` in the network namespace ``/run/netns/<netns>`` and in this machine's mount
    namespace: nsenter, not ``ip netns exec``, which remounts /sys and so hides the cgroup
    mounts a kubelet and runc need."""
    return [shutil.which("nsenter") or "/usr/bin/nsenter", f"--net=/run/netns/{netns}", "--", *argv]
