"""The one way qemu-img runs on the node: an absolute binary path, a fixed argv, no shell, a
timeout, and its JSON output parsed in one place."""

import shutil
import subprocess
from pathlib import Path

from formation_vmm.host.disk_info import DiskInfo, parse_info


class QemuImgError(OSError):
    """qemu-img refused or failed; an OSError so a VM's sync reports it as a host error."""


# A conversion of a large image may take this long; a hung qemu-img must not hang a thread.
TIMEOUT_SECONDS = 3600.0


def qemu_img() -> str:
    """Absolute path of qemu-img, so no later change of PATH or cwd picks another binary."""
    found = shutil.which("qemu-img")
    if found is None:
        raise FileNotFoundError("qemu-img is not installed (Debian package qemu-utils)")
    return found


def run(*args: str, ok_codes: tuple[int, ...] = (0,), timeout: float = TIMEOUT_SECONDS) -> str:
    """qemu-img ``args``; its stdout, or QemuImgError with its stderr."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed binary, argv from this package, no shell
            [qemu_img(), *args], check=False, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        raise QemuImgError(f"qemu-img {args[0]} took longer than {timeout:.0f}s") from exc
    if done.returncode not in ok_codes:
        raise QemuImgError(f"qemu-img {args[0]} failed: {done.stderr.strip()[:300]}")
    return done.stdout


def info(path: Path, fmt: str | None = None) -> DiskInfo:
    """``-U``: readable even while QEMU holds the image open."""
    args = ["info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    return parse_info(run(*args, str(path)))
