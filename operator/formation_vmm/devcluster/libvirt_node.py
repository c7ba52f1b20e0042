"""A node's own libvirtd and virtlogd on this machine, so several nodes (and several clusters,
and the test suite beside `vmm dev up`) never share one daemon.

Each runs in a private mount namespace (and, when asked, a named network namespace of its own,
``/run/netns/<name>``, which outlives the daemon as the guests do), with
per-node copies of libvirt's directories bind-mounted over ``/etc/libvirt``, ``/run/libvirt``,
``/var/lib/libvirt``, ``/var/cache/libvirt`` and ``/var/log/libvirt``, its own ``unix_sock_dir``
(outside those, so the agent and other nodes reach it), its own pid files, and an explicit
``host_uuid`` (this machine has no SMBIOS: without one each start gets a random UUID, and two
equal ones make libvirt refuse a migration "to the same host"). libvirt documents running its
daemons side by side this way. QEMU processes outlive the daemon, as on a real host: ``stop``
destroys the domains first, then kills whatever QEMU is left from its pid file.
"""

import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from formation_vmm.agent.hypervisor import Hypervisor, probe
from formation_vmm.devcluster.processes import ProcessTable, alive, spawn, stop

# libvirt's directories that get a per-node copy, as (name under the node's root, mount point).
MOUNTS = (
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("cache", "/var/cache/libvirt"),
    ("log", "/var/log/libvirt"),
    # The migration relay's sockets (the agent's default migration_relay_dir): each node's QEMU
    # listens at the same path as the other node's relay, as on separate machines.
    ("r", "/run/formation-vmm/migration"),
)
# As root in a sandbox without cgroup delegation or mount namespaces for QEMU.
QEMU_CONF = """user = "root"
group = "root"
cgroup_controllers = [ ]
namespaces = [ ]
"""


# The longest socket libvirtd makes in its socket directory, and Linux's limit on a UNIX socket's
# path (108 bytes with the final NUL): past it, libvirtd cannot bind that socket and exits.
LONGEST_SOCKET = "libvirt-admin-sock"
SOCKET_PATH_MAX = 107


class LibvirtNodeError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> None:
    """iproute2's ``ip``, for the node's network namespace."""
    ip = shutil.which("ip") or "/usr/sbin/ip"
    done = subprocess.run([ip, *args], capture_output=True, text=True, check=False)  # noqa: S603 - fixed argv
    if check and done.returncode != 0:
        raise LibvirtNodeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


class LibvirtNode:
    def __init__(
        self,
        root: Path,
        name: str,
        processes: ProcessTable,
        network_namespace: bool = False,
        netns: str | None = None,
    ) -> None:
        """``netns`` names an existing network namespace to run in (a kubelet node's, so that
        its guests' networks sit beside its pods'); otherwise ``network_namespace`` makes one."""
        self.root = root
        self.name = name
        self.processes = processes
        self.network_namespace = network_namespace or netns is not None
        # Stable for the node (a restarted daemon keeps its identity), distinct between nodes.
        self.host_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"formation-vmm:{root.resolve()}:{name}"))
        self.sock_dir = root / "sock"
        self.log = root / "libvirtd.log"
        # Named after the node's directory: two clusters (or the tests beside `vmm dev up`) never
        # share one, and a restarted daemon finds the namespace its guests still live in.
        self.netns = netns or "vmm-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def socket(self) -> Path:
        return self.sock_dir / "libvirt-sock"

    @property
    def relay_dir(self) -> Path:
        """The migration relay's directory, as seen from outside the namespace."""
        return self.root / "r"

    def path(self, inside: str) -> Path:
        """Where a path under one of libvirt's directories inside the namespace lies outside it
        (``/run/libvirt/qemu/x.pid`` -> ``<root>/run/qemu/x.pid``)."""
        for local, mount in MOUNTS:
            if inside == mount or inside.startswith(mount + "/"):
                return self.root / local / inside[len(mount) + 1 :]
        raise ValueError(f"{inside} is not under one of libvirt's directories")

    def _prepare(self) -> None:
        for local, _ in MOUNTS:
            (self.root / local).mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        if not (etc / "libvirtd.conf").exists():
            shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True, symlinks=True)
            # No network of the host's starts in this node's namespace by itself.
            shutil.rmtree(etc / "qemu" / "networks" / "autostart", ignore_errors=True)
        (etc / "qemu.conf").write_text(QEMU_CONF)
        (etc / "libvirtd.conf").write_text(
            f'unix_sock_dir = "{self.sock_dir}"\nhost_uuid = "{self.host_uuid}"\n'
            'unix_sock_group = "root"\nunix_sock_rw_perms = "0770"\nauth_unix_rw = "none"\n'
        )
        (etc / "virtlogd.conf").write_text("")

    def _script(self) -> str:
        # One command per line: `set -e` does not stop at a failure inside an `a && b` list, and
        # a libvirtd started without one of these mounts would use (and fill) the host's own
        # directory. A fresh host may not have them yet (libvirtd makes /run/libvirt when it
        # first runs; a cold CI machine never ran it), so they are made first: empty
        # directories, like the ones the libvirt packages ship.
        points = " ".join(point for _, point in MOUNTS)
        lines = [
            "set -e",
            "mount --make-rprivate /",
            f"mkdir -p {points}",
            *(f"mount --bind {shlex.quote(str(self.root / local))} {point}" for local, point in MOUNTS),
            f"virtlogd -p {shlex.quote(str(self.root / 'virtlogd.pid'))} &",
            f"exec libvirtd --pid-file {shlex.quote(str(self.root / 'libvirtd.pid'))}",
        ]
        return "\n".join(lines)

    @property
    def _key(self) -> str:
        return f"libvirtd-{self.name}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the daemons (again: QEMU processes that outlived them are taken up again)."""
        longest = self.sock_dir / LONGEST_SOCKET
        if len(str(longest)) > SOCKET_PATH_MAX:
            raise LibvirtNodeError(
                f"libvirtd of {self.name} would bind {longest}, {len(str(longest))} bytes: a UNIX "
                f"socket's path may have {SOCKET_PATH_MAX}. Use a shorter directory (VMM_DEV_DIR "
                "for `vmm dev up`)"
            )
        self._prepare()
        argv = ["unshare", "--mount", "sh", "-c", self._script()]
        if self.network_namespace:
            self._make_netns()
            argv = ["ip", "netns", "exec", self.netns, *argv]
        pid = spawn(argv, self.log)
        self.processes.add(self._key, pid)
        deadline = time.monotonic() + timeout
        why: str | None = "not started"
        while time.monotonic() < deadline:
            if not alive(pid):
                tail = self.log.read_text(errors="replace")[-2000:]
                raise LibvirtNodeError(f"libvirtd of {self.name} exited; {self.log}:\n{tail}")
            why = probe(self.uri)
            if why is None:
                return
            time.sleep(0.2)
        raise LibvirtNodeError(f"libvirtd of {self.name} does not answer at {self.uri}: {why}")

    def pid(self) -> int | None:
        return self.processes.read().get(self._key)

    def _make_netns(self) -> None:
        if not self.netns_path().exists():
            _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "set", "lo", "up")

    def netns_path(self) -> Path:
        """The node's network namespace (its guests' networks live there): the file to setns()
        into, or to name to ``nsenter --net=``."""
        return Path("/run/netns") / self.netns

    def in_netns(self, *argv: str) -> list[str]:
        """``argv`` run inside the node's network namespace (``ip netns exec``)."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.network_namespace else list(argv)

    def _remove_netns(self) -> None:
        if self.netns_path().exists():
            _ip("netns", "delete", self.netns, check=False)

    def destroy_domains(self) -> list[str]:
        """Destroy and undefine every domain of this node's daemon (if it answers)."""
        if probe(self.uri) is not None:
            return []
        hypervisor = Hypervisor(self.uri)
        names = []
        try:
            for info in hypervisor.owned_domains():
                hypervisor.destroy(info.name)
                hypervisor.undefine(info.name)
                names.append(info.name)
        finally:
            hypervisor.close()
        return names

    def kill_leftovers(self) -> None:
        """QEMU (and dnsmasq) processes the daemon started and that outlived it, then the
        network namespace they lived in."""
        for pidfile in [*self.root.glob("run/qemu/*.pid"), *self.root.glob("run/network/*.pid")]:
            try:
                pid = int(pidfile.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if str(self.root).encode() in cmdline or pidfile.stem.encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
        self._remove_netns()

    def kill_daemon(self) -> None:
        """Kill libvirtd and virtlogd the hard way, as a crash would; the guests run on."""
        pid = self.pid()
        if pid is not None:
            stop(pid, timeout=0)

    def stop(self) -> None:
        self.destroy_domains()
        pid = self.pid()
        if pid is not None:
            stop(pid)
        self.kill_leftovers()
