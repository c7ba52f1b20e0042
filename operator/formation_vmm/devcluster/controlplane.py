"""Start etcd, kube-apiserver (secure port, client certs, RBAC) and kube-controller-manager on
free loopback ports; write an admin kubeconfig; wait for /readyz; tear everything down.

Used by the pytest fixtures and by ``vmm dev up`` alike.
"""

import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from formation_vmm.devcluster import certs
from formation_vmm.devcluster.processes import ProcessTable, alive, free_port, netns_argv, spawn, stop

BINARIES = (
    "etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm",
    # A real node (kube_node.py) and the plane that schedules its pods.
    "kubelet", "kube-proxy", "kube-scheduler",
)  # fmt: skip
# Services' virtual addresses; the first is the `kubernetes` Service, the apiserver as pods see it.
SERVICE_RANGE = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"


class ControlPlaneError(RuntimeError):
    """The control plane could not start; the message names the log to read."""


def find_binaries(bin_dir: Path | None = None, recorded: Path | None = None) -> Path:
    """The directory holding every binary, the one way every ``vmm dev`` verb and test looks:
    ``bin_dir``, ``$VMM_BIN_DIR``, ``$KUBEBUILDER_ASSETS``, the directory a dev cluster
    recorded when it started (the file ``recorded``), then the cache hack/control-plane-bins.sh
    fills (when run from a clone)."""
    candidates = [bin_dir] if bin_dir else []
    candidates += [
        Path(p) for p in (os.environ.get("VMM_BIN_DIR"), os.environ.get("KUBEBUILDER_ASSETS")) if p
    ]
    if recorded is not None and recorded.is_file():
        candidates.append(Path(recorded.read_text().strip()))
    for cand in candidates:
        if _complete(cand):
            return cand
    # The script's cache last, asked only when nothing else has them (it runs a subprocess).
    for cand in _cached():
        if _complete(cand):
            return cand
    raise ControlPlaneError(
        "kube-apiserver, kube-controller-manager, kubectl, etcd and helm were not found; run "
        "hack/control-plane-bins.sh and set VMM_BIN_DIR to the directory it prints"
    )


def _complete(directory: Path) -> bool:
    return all((directory / b).exists() for b in BINARIES)


def _cached() -> list[Path]:
    """Where hack/control-plane-bins.sh keeps the pinned versions (it says, with --dir: the
    versions live in that script alone); nothing outside a clone."""
    script = Path(__file__).resolve().parents[3] / "hack" / "control-plane-bins.sh"
    if not script.is_file():
        return []
    found = subprocess.run(  # noqa: S603 - our own script, fixed argv
        ["bash", str(script), "--dir"],  # noqa: S607 - bash from PATH, as hack/ runs it
        capture_output=True,
        text=True,
        check=False,
    )
    return [Path(found.stdout.strip())] if found.returncode == 0 and found.stdout.strip() else []


@dataclass(frozen=True)
class Endpoints:
    etcd: int
    etcd_peer: int
    apiserver: int


class ControlPlane:
    """One local control plane living in ``root`` (certs, etcd data, logs, kubeconfig, pids)."""

    def __init__(
        self, root: Path, bin_dir: Path | None = None, netns: str | None = None, node_ip: str | None = None
    ) -> None:
        """With ``netns`` (and the ``node_ip`` it holds), etcd, the apiserver and the controller
        manager run inside that network namespace, the apiserver on every address there; a
        relay makes it reachable on this machine's loopback at the same port, so one kubeconfig
        serves both sides (kube_node.py)."""
        self.root = root
        self.bin_dir = bin_dir
        self.netns = netns
        self.node_ip = node_ip
        self.pki = root / "pki"
        self.logs = root / "logs"
        self.kubeconfig = root / "kubeconfig"
        self.processes = ProcessTable(root / "pids.json")
        self._apiserver: tuple[list[str], int] | None = None  # argv and port, for a restart

    # --- lifecycle ---------------------------------------------------------------------------

    def binaries(self) -> Path:
        """The binaries this plane runs with: as given, found, or as recorded when it started
        (so `vmm dev status` works from a shell without VMM_BIN_DIR)."""
        return find_binaries(self.bin_dir, self.root / "bin-dir")

    def running(self) -> bool:
        table = self.processes.read()
        return bool(table) and all(alive(pid) for pid in table.values())

    def start(self, timeout: float = 60.0) -> None:
        """Start from a clean state: anything a crashed earlier run left is stopped and wiped."""
        bins = self.binaries()
        self.stop()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "bin-dir").write_text(f"{bins}\n")
        shutil.rmtree(self.root / "etcd", ignore_errors=True)
        certs.make_pki(self.pki, server_ips=(self.node_ip, SERVICE_IP) if self.node_ip else ())
        for attempt in range(3):
            ports = Endpoints(free_port(), free_port(), free_port())
            self._write_kubeconfig(ports.apiserver)
            try:
                self._start_etcd(bins, ports)
                self._start_apiserver(bins, ports)
                if self.netns:
                    relay = [sys.executable, "-m", "formation_vmm.devcluster.netns_relay", self.netns]
                    relay.append(str(ports.apiserver))
                    self.processes.add("relay", spawn(relay, self.logs / "relay.log"))
                self._wait_ready(ports.apiserver, timeout)
                self._start_controller_manager(bins)
                if self.netns:
                    self._start_scheduler(bins)
                return
            except ControlPlaneError:
                self.stop()
                # A port free when chosen can be taken before the process binds it (another
                # process's outgoing connection): choose again, a few times.
                if attempt == 2 or not self._port_was_taken():
                    raise
                shutil.rmtree(self.root / "etcd", ignore_errors=True)
            except BaseException:
                self.stop()
                raise

    def _inside(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the plane's network namespace, if it has one."""
        return netns_argv(self.netns, argv) if self.netns else argv

    def _port_was_taken(self) -> bool:
        logs = [self.logs / "kube-apiserver.log", self.logs / "etcd.log"]
        return any(
            "address already in use" in log.read_text(errors="replace") for log in logs if log.exists()
        )

    def stop(self) -> None:
        self.processes.stop_all()

    # --- pieces ------------------------------------------------------------------------------

    def _start_etcd(self, bins: Path, ports: Endpoints) -> None:
        client = f"http://127.0.0.1:{ports.etcd}"
        peer = f"http://127.0.0.1:{ports.etcd_peer}"
        argv = [
            str(bins / "etcd"),
            f"--data-dir={self.root / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=default={peer}",
            # A throw-away cluster: durability buys nothing and fsync costs seconds per test.
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ]
        self.processes.add("etcd", spawn(self._inside(argv), self.logs / "etcd.log"))

    def _start_apiserver(self, bins: Path, ports: Endpoints) -> None:
        pki = self.pki
        argv = [
            str(bins / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{ports.etcd}",
            f"--bind-address={'0.0.0.0' if self.netns else '127.0.0.1'}",  # noqa: S104 - inside the node's namespace
            f"--advertise-address={self.node_ip or '127.0.0.1'}",
            f"--secure-port={ports.apiserver}",
            f"--tls-cert-file={pki / 'server.crt'}",
            f"--tls-private-key-file={pki / 'server.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--token-auth-file={self._admin_token_file()}",
            # A real node's kubelet is held to its own node's objects, as on any cluster.
            f"--authorization-mode={'Node,RBAC' if self.netns else 'RBAC'}",
            *(["--enable-admission-plugins=NodeRestriction"] if self.netns else []),
            # For logs, exec and port-forward through the apiserver.
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            # Kubelets are reached at their node address: node names resolve nowhere here.
            "--kubelet-preferred-address-types=InternalIP",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            f"--service-cluster-ip-range={SERVICE_RANGE}",
            # The aggregation layer: the apiserver proxies our subresources API to the
            # controller as a front proxy, naming the user in headers (controller/serving/front_proxy.py).
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            f"--requestheader-allowed-names={certs.FRONT_PROXY_CLIENT}",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-uid-headers=X-Remote-Uid",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            # In a node's namespace the controller is a pod: reach it at its endpoint's address
            # (no kube-proxy there for a Service's cluster IP). On the host it is a process the
            # Service names by ExternalName (localhost).
            *(["--enable-aggregator-routing=true"] if self.netns else []),
            "--allow-privileged=true",
            f"--cert-dir={pki}",
            "--v=1",
        ]
        argv = self._inside(argv)
        self.processes.add("kube-apiserver", spawn(argv, self.logs / "kube-apiserver.log"))
        self._apiserver = (argv, ports.apiserver)

    def restart_apiserver(self, timeout: float = 60.0, down_seconds: float = 0.0) -> None:
        """Stop kube-apiserver and start it again as before: every watch of every client
        breaks, and each must list again (what an apiserver upgrade or crash does)."""
        assert self._apiserver is not None, "only the process that started this plane restarts it"
        argv, port = self._apiserver
        pid = self.processes.read().get("kube-apiserver")
        if pid is not None:
            stop(pid)
        time.sleep(down_seconds)  # an outage that long: what clients do while it lasts
        self.processes.add("kube-apiserver", spawn(argv, self.logs / "kube-apiserver.log"))
        self._wait_ready(port, timeout)

    def _start_controller_manager(self, bins: Path) -> None:
        argv = [
            str(bins / "kube-controller-manager"),
            *self._component_kubeconfigs(),
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            "--use-service-account-credentials=false",
            # Garbage collection and namespace deletion are what the tests rely on. Node
            # lifecycle (taints of nodes not ready) only where real kubelets report: elsewhere
            # the tests' Nodes have none.
            "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller"
            + ("" if self.netns else ",-nodelifecycle"),
            "--v=1",
        ]
        self.processes.add(
            "kube-controller-manager", spawn(self._inside(argv), self.logs / "kube-controller-manager.log")
        )

    def _component_kubeconfigs(self) -> list[str]:
        """A controller manager's or scheduler's credentials: the admin's, for the API and for
        delegated authentication and authorization alike."""
        return [f"--{kind}={self.kubeconfig}" for kind in ("kubeconfig", "authentication-kubeconfig",
                                                           "authorization-kubeconfig")]  # fmt: skip

    def _start_scheduler(self, bins: Path) -> None:
        """Only a plane with real nodes (kube_node.py) schedules pods; VMs are placed by our own
        controller, so the other planes need none."""
        argv = [
            str(bins / "kube-scheduler"),
            *self._component_kubeconfigs(),
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={free_port()}",
            "--v=1",
        ]
        self.processes.add("kube-scheduler", spawn(self._inside(argv), self.logs / "kube-scheduler.log"))

    def _admin_token_file(self) -> Path:
        """A static bearer token for the admin, beside the client certificate: what the agent
        sees of a user is a token (``kubectl vm console`` sends it, the agent reviews it), and a
        client certificate cannot be passed on. The apiserver takes the certificate first."""
        path = self.pki / "tokens.csv"
        if not path.exists():
            path.write_text(f'{secrets.token_urlsafe(32)},dev-admin,dev-admin,"system:masters"\n')
            path.chmod(0o600)
        return path

    def _write_kubeconfig(self, port: int) -> None:
        pki = self.pki
        token = self._admin_token_file().read_text().split(",", 1)[0]
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "formation-vmm-dev",
                    "cluster": {
                        "server": f"https://127.0.0.1:{port}",
                        "certificate-authority": str(pki / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate": str(pki / "admin.crt"),
                        "client-key": str(pki / "admin.key"),
                        "token": token,
                    },
                }
            ],
            "contexts": [
                {"name": "formation-vmm-dev", "context": {"cluster": "formation-vmm-dev", "user": "admin"}}
            ],
            "current-context": "formation-vmm-dev",
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self.kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
        self.kubeconfig.chmod(0o600)

    def _wait_ready(self, port: int, timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        url = f"https://127.0.0.1:{port}/readyz"
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for name, pid in self.processes.read().items():
                if not alive(pid):
                    raise ControlPlaneError(f"{name} exited; see {self.logs / (name + '.log')}")
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ControlPlaneError(f"kube-apiserver not ready after {timeout:.0f}s ({last}); see {self.logs}")
