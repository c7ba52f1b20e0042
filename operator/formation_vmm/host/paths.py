"""Paths on the node built from manifest values: kept inside their base directory, with every
symlink resolved, opened without following a symlink, removed without following one."""

import fcntl
import os
import shutil
from pathlib import Path


class UnsafePathError(RuntimeError):
    """A path that would leave its base directory (through '..' or a symlink)."""


def ensure_inside(base: Path, path: Path) -> Path:
    """Return ``path`` if, with every symlink resolved, it stays inside ``base``."""
    real_base = base.resolve()
    real = path.resolve()
    if real != real_base and real_base not in real.parents:
        raise UnsafePathError(f"{path} resolves to {real}, outside {real_base}")
    return path


def make_dir(base: Path, path: Path, mode: int = 0o711) -> None:
    """Create ``path`` (and its parents) inside ``base``. 0711 by default: QEMU, which may run
    as a user of its own, must traverse to a VM's files; nobody but root lists or writes them
    (the files themselves are 0600, handed to QEMU by libvirt)."""
    base.mkdir(parents=True, exist_ok=True)
    ensure_inside(base, path)
    missing = []
    for parent in [path, *path.parents]:
        if parent == base or parent.exists():
            break
        missing.append(parent)
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        directory.chmod(mode)  # whatever the umask said
    ensure_inside(base, path)  # again: a component may have been a symlink created meanwhile


def open_new(path: Path, mode: int = 0o600) -> int:
    """A file descriptor for writing a new file at ``path``; O_EXCL|O_NOFOLLOW: never through a
    symlink someone placed there, never into a file that exists."""
    path.unlink(missing_ok=True)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)


def open_read(path: Path) -> int:
    """A file descriptor for reading ``path``, refusing a symlink in its last component."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)


def remove_tree(base: Path, path: Path) -> None:
    """Remove a directory inside ``base``; a symlink in its place is removed, never followed."""
    if path.is_symlink():
        path.unlink()
        return
    if not path.exists():
        return
    ensure_inside(base, path)
    shutil.rmtree(path)


class AlreadyRunningError(RuntimeError):
    """Another process holds the lock."""


def hold_lock(path: Path) -> int:
    """Take an exclusive lock on ``path`` for the life of this process (the descriptor stays
    open); AlreadyRunningError naming the holder if another process has it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise AlreadyRunningError(f"another process (pid {holder}) holds {path}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
