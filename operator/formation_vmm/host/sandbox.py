"""qemu-img on untrusted images, in a sandbox: what CDI does (address-space and CPU-time limits)
and more. The agent is root; an image is a tenant's. A crafted image must not make qemu-img read
a file of the node (the service account token, another tenant's cached bytes), write anywhere,
connect anywhere, or eat the node's memory or CPU.

The sandbox is Landlock (a Linux security module any process may apply to itself, no privilege
needed, so it works in an unprivileged container): qemu-img may read and execute only the system
directories it runs from and the files it is handed, write only the scratch directory, and open
no TCP connection; plus rlimits (address space, CPU time, file size, open files), no new
privileges, an empty environment, a session of its own. Chosen over a separate user (which could
still read world-readable files and write world-writable directories), a mount namespace (which
needs CAP_SYS_ADMIN in the agent's pod) and bubblewrap (which needs user namespaces, often off in
pods).

A small launcher (``LAUNCHER``, run by this Python with ``-I -S``) applies the limits to itself
and then execs qemu-img: nothing runs between fork and exec in the threaded agent.
"""

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from formation_vmm.host.qemu_img import QemuImgError, qemu_img

# What qemu-img runs from: binaries, shared libraries (merged-/usr: /lib is a link into /usr),
# the dynamic linker's cache, locale data. Read and execute only.
SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/dev/urandom",
)
# qemu-img probes file locking on /dev/null.
SYSTEM_WRITE = ("/dev/null",)

# CDI's limits for qemu-img on imported images (the agent's settings can change them).
INFO_MEMORY = 1 << 30
INFO_CPU_SECONDS = 30
# What is kept of each of qemu-img's output streams.
OUTPUT_KEEP = 1 << 20


@dataclass(frozen=True)
class Limits:
    memory: int = INFO_MEMORY  # address space, bytes
    cpu_seconds: int = INFO_CPU_SECONDS
    file_size: int = 0  # largest file it may write (0: it writes none)
    wall_seconds: float = 120.0


class SandboxUnavailableError(RuntimeError):
    """This kernel (or the container's seccomp profile) offers no Landlock."""


def landlock_abi() -> int:
    """The Landlock ABI version this process may use, 0 when there is none."""
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def run(
    args: list[str], reads: list[Path], scratch: Path | None, limits: Limits, ok_codes: tuple[int, ...] = (0,)
) -> str:
    """qemu-img ``args`` in the sandbox: it may read ``reads`` (files or directories) and write
    inside ``scratch``. Its stdout, or QemuImgError with its stderr."""
    return run_program(qemu_img(), args, reads, scratch, limits, ok_codes)


def run_program(
    program: str,
    args: list[str],
    reads: list[Path],
    scratch: Path | None,
    limits: Limits,
    ok_codes: tuple[int, ...] = (0,),
) -> str:
    """``program`` in the same sandbox (qemu-img in the agent; the tests also try others)."""
    what = " ".join([Path(program).name, *args[:1]])  # "qemu-img info"
    if landlock_abi() < 1:
        raise SandboxUnavailableError(
            "this kernel offers no Landlock (Linux 5.13+, CONFIG_SECURITY_LANDLOCK, and 'landlock' in "
            "the lsm= boot list; in a container, a seccomp profile that allows the landlock_* calls), "
            "which the agent needs to run qemu-img on untrusted images"
        )
    config = {
        "read": [*SYSTEM_READ, *(str(p) for p in reads)],
        "write": [*SYSTEM_WRITE, *([str(scratch)] if scratch is not None else [])],
        "memory": limits.memory,
        "cpu": limits.cpu_seconds,
        "fsize": limits.file_size,
    }
    argv = [sys.executable, "-I", "-S", "-c", LAUNCHER, json.dumps(config), program, *args]
    code, out, err = _bounded_run(argv, scratch, limits.wall_seconds)
    if code is None:
        raise QemuImgError(f"{what} took longer than {limits.wall_seconds:.0f}s")
    if code not in ok_codes:
        detail = err.strip()[:300]
        if code < 0 or not detail:
            detail = _signal_text(code) + (f"; it said: {detail}" if detail else "")
        raise QemuImgError(f"{what} failed: {detail}")
    return out


def _bounded_run(argv: list[str], cwd: Path | None, timeout: float) -> tuple[int | None, str, str]:
    """Run ``argv``, keeping at most OUTPUT_KEEP of each stream (the rest is read and dropped: a
    crafted image can make qemu-img print without end). (exit code or None on timeout, out, err)."""
    proc = subprocess.Popen(  # noqa: S603 - fixed launcher and binary, argv from this package
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
        cwd=str(cwd) if cwd is not None else "/",
        start_new_session=True,
    )
    kept: dict[str, bytearray] = {"out": bytearray(), "err": bytearray()}

    def drain(stream: IO[bytes], into: bytearray) -> None:
        for chunk in iter(lambda: stream.read(65536), b""):
            if len(into) < OUTPUT_KEEP:
                into.extend(chunk[: OUTPUT_KEEP - len(into)])

    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=drain, args=(proc.stdout, kept["out"]), daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, kept["err"]), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        code: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for reader in readers:
        reader.join()
    return code, kept["out"].decode(errors="replace"), kept["err"].decode(errors="replace")


def _signal_text(code: int) -> str:
    if code < 0:
        name = {9: "SIGKILL", 24: "SIGXCPU", 25: "SIGXFSZ", 6: "SIGABRT", 11: "SIGSEGV"}.get(
            -code, str(-code)
        )
        return f"killed by {name} (a sandbox limit: memory, CPU time or file size)"
    return f"exit status {code}"


# x86_64 and aarch64 share these numbers (the generic syscall table since Linux 5.13).
_SYS_LANDLOCK_CREATE_RULESET = 444
_LANDLOCK_CREATE_RULESET_VERSION = 1

# The launcher: stdlib only (it runs with -I -S), applies limits and Landlock, then execs.
LAUNCHER = r"""
import ctypes, json, os, resource, sys
cfg = json.loads(sys.argv[1]); argv = sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
def fail(what):
    err = ctypes.get_errno()
    sys.stderr.write("sandbox: %s: %s\n" % (what, os.strerror(err))); sys.exit(125)
mem, cpu, fsize = cfg["memory"], cfg["cpu"], cfg["fsize"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU first, SIGKILL a second later
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("no_new_privs")
abi = libc.syscall(444, None, 0, 1)
if abi < 1:
    fail("landlock")
FS = [1 << i for i in range(16)]
# Rights by ABI: 1 has 13 (execute .. make_sym), 2 adds refer, 3 truncate, 5 ioctl_dev.
fs_all = sum(FS[:13]) | (FS[13] if abi >= 2 else 0) | (FS[14] if abi >= 3 else 0)
fs_all |= FS[15] if abi >= 5 else 0
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
TRUNCATE = FS[14] if abi >= 3 else 0
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE
net_all = 3 if abi >= 4 else 0  # bind and connect TCP
class Ruleset(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
class PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]
size = 8 if abi < 4 else (16 if abi < 6 else 24)
scoped = 3 if abi >= 6 else 0  # abstract unix sockets and signals of other domains
ruleset = Ruleset(fs_all, net_all, scoped)
fd = libc.syscall(444, ctypes.byref(ruleset), size, 0)
if fd < 0:
    fail("landlock_create_ruleset")
def allow(path, rights):
    try:
        pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    if not os.path.isdir(path):
        rights &= FILE_RIGHTS
    rule = PathBeneath(rights, pfd)
    if libc.syscall(445, fd, 1, ctypes.byref(rule), 0) != 0:
        fail("landlock_add_rule " + path)
    os.close(pfd)
for path in cfg["read"]:
    allow(path, EXECUTE | READ_FILE | READ_DIR)
for path in cfg["write"]:
    allow(path, fs_all)
if libc.syscall(446, fd, 0) != 0:
    fail("landlock_restrict_self")
os.close(fd)
os.execve(argv[0], argv, {"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
"""
