"""Background processes that outlive the command that started them, recorded in a state file so
another command (``vmm dev down``, a test's teardown) can stop them and leave nothing behind."""

import contextlib
import json
import os
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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for every purpose here; reap it.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM the process group of ``pid``, then SIGKILL whatever is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(0.05)


class ProcessTable:
    """name -> pid, kept in a JSON file beside the processes' logs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {str(k): int(v) for k, v in data.items()}

    def add(self, name: str, pid: int) -> None:
        table = self.read()
        table[name] = pid
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        os.replace(tmp, self.path)

    def stop_all(self) -> None:
        """Stop every recorded process, newest first, and forget them."""
        for _name, pid in reversed(list(self.read().items())):
            stop(pid)
        self.path.unlink(missing_ok=True)
