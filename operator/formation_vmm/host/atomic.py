"""Files written whole or not at all: a temporary name beside the target, fsync, rename, and the
directory fsync'd so the rename survives a crash."""

import os
from pathlib import Path

from formation_vmm.host.paths import open_new


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes, mode: int = 0o600, tmp: Path | None = None) -> None:
    """Replace ``path`` with ``data``; ``tmp`` is where it is written first (default: a dot-name
    beside it)."""
    tmp = tmp or path.with_name(f".{path.name}.tmp")
    with os.fdopen(open_new(tmp, mode), "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
