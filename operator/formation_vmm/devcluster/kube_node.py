"""A real Kubernetes node on this machine: kubelet, containerd with runc, the CNI plugins and
kube-proxy, all inside a network namespace the node owns. Pods run from images imported into
its containerd (nothing is pulled: no registry is reachable), and the pod sandbox image is the
one built here (pause_image.py).

Why a namespace: the kubelet refuses a loopback node address, pods get addresses from CNI, and
nothing may hold a non-loopback address in this machine's own namespace. So the node address
lives on a veth whose both ends are inside the namespace, its default route leads there too (a
packet for anywhere else is dropped inside, never sent off the machine), the pods' bridge is
there, and the control plane runs there as well (ControlPlane with ``netns``), reachable from
this machine's loopback through a relay on the same port.

This machine mounts cgroup v1: the kubelet uses the ``cgroupfs`` driver (no systemd here) with
``failCgroupV1: false``, containerd's runc ``SystemdCgroup = false``, and the node's pods live
under a cgroup root of their own (``/<netns>``), so two nodes, or a node and the tests, never
share one. Everything else the daemons keep (their roots, state, sockets, logs, CNI's address
leases) is under the node's directory; `stop` unmounts what the kubelet mounted there."""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from formation_vmm.devcluster import certs
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.processes import ProcessTable, alive, netns_argv, spawn, stop

CGROUP_V1 = Path("/sys/fs/cgroup")
CNI_BIN = Path("/usr/lib/cni")
SERVICE_DOMAIN = "cluster.local"


# containerd refuses a longer path for its socket (its own limit, under Linux's 108).
SOCKET_PATH_MAX = 104


class KubeNodeError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> None:
    ip = shutil.which("ip") or "/usr/sbin/ip"
    done = subprocess.run([ip, *args], capture_output=True, text=True, check=False)  # noqa: S603 - fixed argv
    if check and done.returncode != 0:
        raise KubeNodeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


class KubeNode:
    def __init__(
        self,
        root: Path,
        name: str,
        netns: str,
        processes: ProcessTable,
        node_ip: str = "10.200.0.2",
        pod_cidr: str = "10.244.0.0/24",
    ) -> None:
        self.root = root
        self.name = name
        self.netns = netns
        self.processes = processes
        self.node_ip = node_ip
        self.pod_cidr = pod_cidr
        self.logs = root / "logs"
        self.containerd_sock = root / "containerd" / "containerd.sock"
        self.cgroup_root = f"/{netns}"

    # --- the network namespace ------------------------------------------------------------

    def make_network(self) -> None:
        """The namespace with the node's address, and forwarding on (pods reach services
        through it). Idempotent."""
        if not Path(f"/run/netns/{self.netns}").exists():
            _ip("netns", "add", self.netns)
        _ip("-n", self.netns, "link", "set", "lo", "up")
        # A veth pair with both ends inside (this kernel has no dummy device): the node's
        # address on one end, the other end leads nowhere.
        if not self._has_link("node0"):
            _ip("-n", self.netns, "link", "add", "node0", "type", "veth", "peer", "name", "node0-end")
        _ip("-n", self.netns, "addr", "replace", f"{self.node_ip}/24", "dev", "node0")
        _ip("-n", self.netns, "link", "set", "node0-end", "up")
        _ip("-n", self.netns, "link", "set", "node0", "up")
        _ip("-n", self.netns, "route", "replace", "default", "dev", "node0")
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1")):
            self.inside_run("sysctl", "-q", "-w", f"{key}={value}")

    def _has_link(self, name: str) -> bool:
        ip = shutil.which("ip") or "/usr/sbin/ip"
        done = subprocess.run([ip, "-n", self.netns, "link", "show", name], capture_output=True, check=False)  # noqa: S603
        return done.returncode == 0

    def inside(self, *argv: str) -> list[str]:
        return netns_argv(self.netns, argv)

    def inside_run(self, *argv: str) -> str:
        done = subprocess.run(self.inside(*argv), capture_output=True, text=True, check=False)  # noqa: S603
        if done.returncode != 0:
            raise KubeNodeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
        return done.stdout

    # --- containerd -------------------------------------------------------------------------

    def _containerd_config(self) -> Path:
        d = self.root / "containerd"
        cni = self.root / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-vmm-node.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "vmm-node",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": self.pod_cidr}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                                "dataDir": str(cni / "ipam"),
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=2,
            )
        )
        config = f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]

[grpc]
  address = "{self.containerd_sock}"

[ttrpc]
  address = "{d / "ttrpc.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/formation-vmm/pause:1"
  # This machine refuses a negative oom_score_adj even to root (the kubelet asks -998 for
  # sandboxes): containerd keeps every container's at or above its own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d / "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{cni / "net.d"}"
"""
        path = d / "config.toml"
        d.mkdir(parents=True, exist_ok=True)
        path.write_text(config)
        return path

    def _start_containerd(self, timeout: float = 30.0) -> None:
        if len(str(self.containerd_sock)) > SOCKET_PATH_MAX:
            raise KubeNodeError(
                f"containerd's socket path {self.containerd_sock} is over {SOCKET_PATH_MAX} bytes, which "
                "containerd refuses: use a shorter directory (VMM_DEV_DIR for `vmm dev up --kubelet`)"
            )
        argv = self.inside("containerd", "--config", str(self._containerd_config()))
        self.processes.add(f"containerd-{self.name}", spawn(argv, self.logs / "containerd.log"))
        self._wait(lambda: self._ctr("version") is not None, timeout, "containerd", "containerd.log")

    def _ctr(self, *args: str) -> str | None:
        done = subprocess.run(  # noqa: S603 - fixed argv
            ["ctr", "--address", str(self.containerd_sock), "--namespace", "k8s.io", *args],  # noqa: S607
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout if done.returncode == 0 else None

    def import_image(self, archive: Path, name: str) -> None:
        """An OCI archive into the node's containerd, as ``name`` (what pods name: a short name is
        docker.io's, as the kubelet normalises it)."""
        first = name.split("/", maxsplit=1)[0]
        if "/" in name and "." not in first and ":" not in first and first != "localhost":
            name = f"docker.io/{name}"
        done = subprocess.run(  # noqa: S603 - fixed argv
            ["ctr", "--address", str(self.containerd_sock), "--namespace", "k8s.io", "images", "import",  # noqa: S607
             "--no-unpack", "--index-name", name, str(archive)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise KubeNodeError(f"ctr import of {archive} failed: {done.stderr.strip()}")
        listed = self._ctr("images", "list", "--quiet") or ""
        if name not in listed.split():
            raise KubeNodeError(f"{name} is not in containerd after importing {archive}: {listed.split()}")

    # --- kubelet and kube-proxy ------------------------------------------------------------

    def _kubeconfig(self, plane: ControlPlane, cert: str) -> Path:
        """A kubeconfig for one of the node's components, from the plane's (same server: inside
        the namespace, the plane's port is the apiserver itself), with its own certificate."""
        config = yaml.safe_load(plane.kubeconfig.read_text())
        pki = plane.pki
        config["users"] = [
            {
                "name": "admin",
                "user": {
                    "client-certificate": str(pki / f"{cert}.crt"),
                    "client-key": str(pki / f"{cert}.key"),
                },
            }
        ]
        path = self.root / f"{cert}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return path

    def _make_cgroup_root(self) -> None:
        for controller in CGROUP_V1.iterdir():
            if controller.is_dir() and not controller.is_symlink() and controller.name != "unified":
                (controller / self.cgroup_root.lstrip("/")).mkdir(exist_ok=True)

    def _start_kubelet(self, bins: Path, plane: ControlPlane) -> None:
        pki = plane.pki
        certs.issue_client(pki, f"kubelet-{self.name}", f"system:node:{self.name}", "system:nodes")
        kubeconfig = self._kubeconfig(plane, f"kubelet-{self.name}")
        self._make_cgroup_root()
        resolv = self.root / "resolv.conf"
        resolv.write_text("nameserver 127.0.0.1\n")  # pods resolve nothing: no DNS leaves the node
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": self.node_ip,
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failCgroupV1": False,
            "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "podLogsDir": str(self.root / "pod-logs"),
            "resolvConf": str(resolv),
            "clusterDomain": SERVICE_DOMAIN,
            # This machine's disk is shared with everything else: evict only when really short.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "enforceNodeAllocatable": ["pods"],
            "protectKernelDefaults": False,
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "syncFrequency": "10s",
            "fileCheckFrequency": "10s",
            "nodeStatusReportFrequency": "10s",
        }
        path = self.root / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = self.inside(
            str(bins / "kubelet"),
            f"--config={path}",
            f"--kubeconfig={kubeconfig}",
            f"--root-dir={self.root / 'kubelet'}",
            f"--cert-dir={self.root / 'kubelet-pki'}",
            f"--hostname-override={self.name}",
            f"--node-ip={self.node_ip}",
            "--v=1",
        )
        self.processes.add(f"kubelet-{self.name}", spawn(argv, self.logs / "kubelet.log"))

    def _start_kube_proxy(self, bins: Path, plane: ControlPlane) -> None:
        certs.issue_client(plane.pki, "kube-proxy", "system:kube-proxy", None)
        kubeconfig = self._kubeconfig(plane, "kube-proxy")
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": self.pod_cidr,
            "hostnameOverride": self.name,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # Inside a network namespace the conntrack table's size is the host's to set.
            "conntrack": {"maxPerCore": 0, "min": 0},
        }
        path = self.root / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        argv = self.inside(str(bins / "kube-proxy"), f"--config={path}", "--v=1")
        self.processes.add(f"kube-proxy-{self.name}", spawn(argv, self.logs / "kube-proxy.log"))

    # --- lifecycle ---------------------------------------------------------------------------

    def start(
        self, bins: Path, plane: ControlPlane, images: list[tuple[Path, str]], timeout: float = 90.0
    ) -> None:
        """containerd (with ``images`` imported: archive, name), kubelet and kube-proxy; returns
        once the Node is Ready."""
        self.make_network()
        self._start_containerd()
        for archive, name in images:
            self.import_image(archive, name)
        self._start_kube_proxy(bins, plane)
        self._start_kubelet(bins, plane)
        kubectl = [str(bins / "kubectl"), f"--kubeconfig={plane.kubeconfig}"]

        def ready() -> bool:
            done = subprocess.run(  # noqa: S603
                [*kubectl, "get", "node", self.name, "-o", "json"],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                return False
            conditions = json.loads(done.stdout).get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        self._wait(ready, timeout, f"node {self.name} Ready", "kubelet.log")

    def _wait(self, done: Callable[[], bool], timeout: float, what: str, log: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done():
                return
            for key, pid in self.processes.read().items():
                if key.endswith(self.name) and not alive(pid):
                    raise KubeNodeError(f"{key} exited; see {self.logs}")
            time.sleep(0.5)
        tail = (self.logs / log).read_text(errors="replace")[-3000:] if (self.logs / log).exists() else ""
        raise KubeNodeError(f"{what}: not after {timeout:.0f} s; {self.logs / log}:\n{tail}")

    def stop(self) -> None:
        """Everything the node started, in order: the kubelet and kube-proxy, every container
        (their shims and processes), containerd; then the mounts left under the node's
        directory, the pods' cgroups, and the node's iptables rules go with its namespace."""
        for key in (f"kubelet-{self.name}", f"kube-proxy-{self.name}"):
            pid = self.processes.read().get(key)
            if pid is not None:
                stop(pid)
        left = self._containers() if self.containerd_sock.exists() else {}
        self._kill_shims()
        pid = self.processes.read().get(f"containerd-{self.name}")
        if pid is not None:
            stop(pid)
        self._remove_pod_leftovers(left)
        self._unmount_all()
        self._remove_cgroups()

    def _containers(self) -> dict[str, str]:
        """Containers still known to containerd (pods the kubelet did not tear down: the node was
        stopped mid-test), by id: the network namespace each was given, if any."""
        found: dict[str, str] = {}
        for cid in (self._ctr("containers", "list", "--quiet") or "").split():
            info = json.loads(self._ctr("containers", "info", cid) or "{}")
            namespaces = info.get("Spec", {}).get("linux", {}).get("namespaces", [])
            found[cid] = next((n.get("path", "") for n in namespaces if n.get("type") == "network"), "")
        return found

    def _remove_pod_leftovers(self, containers: dict[str, str]) -> None:
        """What containerd keeps outside the node's directory and would have removed had the
        kubelet stopped the pods: their network namespaces (pinned under /run/netns) and their
        shims' sockets (/run/containerd/s/, named by a digest of our socket, namespace and id)."""
        for cid, netns in containers.items():
            name = Path(netns).name
            if name.startswith("cni-") and Path(f"/run/netns/{name}").exists():
                _ip("netns", "delete", name, check=False)
            digest = hashlib.sha256(f"{self.containerd_sock}/k8s.io/{cid}".encode()).hexdigest()
            Path(f"/run/containerd/s/{digest}").unlink(missing_ok=True)

    def _kill_shims(self) -> None:
        """containerd-shim-runc-v2 processes of this node's containerd (they outlive it) and
        the containers' processes under them, from one reading of /proc."""
        marker = str(self.containerd_sock).encode()
        parents: dict[int, int] = {}
        shims = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if b"containerd-shim" in cmdline and marker in cmdline:
                shims.append(int(proc.name))
        for shim in shims:
            for pid, parent in parents.items():
                if parent == shim:
                    with_suppress_kill(pid)
            with_suppress_kill(shim)

    def _unmount_all(self) -> None:
        prefix = str(self.root.resolve()) + "/"
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)  # noqa: S603, S607

    def _remove_cgroups(self) -> None:
        for controller in CGROUP_V1.iterdir():
            base = controller / self.cgroup_root.lstrip("/")
            if not base.is_dir():
                continue
            # Bottom-up, and a cgroup that goes while we walk (runc removing a container's, a
            # killed shim's) is skipped: os.walk ignores the directories it can no longer read.
            for parent, children, _ in os.walk(base, topdown=False):
                for child in children:
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(parent, child))
            with contextlib.suppress(OSError):
                base.rmdir()

    def remove_network(self) -> None:
        if Path(f"/run/netns/{self.netns}").exists():
            _ip("netns", "delete", self.netns, check=False)


def with_suppress_kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
