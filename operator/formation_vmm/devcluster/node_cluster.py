"""A one-node Kubernetes cluster on this machine, as users run the product: a control plane
(with a scheduler and node lifecycle), a kubelet node with containerd, runc, CNI and kube-proxy
(kube_node.py), and the node's libvirtd (libvirt_node.py), all in one network namespace of the
cluster's own. The chart is installed on it with `helm install`; its pods run from the image
built here (operator_image.py), imported into the node's containerd. With ``chart_libvirtd``
the node has no libvirtd of its own: the chart runs one (its `libvirtd.enabled`), from the
libvirtd image built here (libvirtd_image.py).

The node's host paths for the chart (VM runtime files, disks, images, the agent's state) and
libvirtd's socket directory lie under the cluster's directory; `chart_values` gives the `--set`
arguments that point the chart there. Everything that needs a non-loopback address (the node,
the pods, the guests) lives in the namespace; from this machine, the apiserver answers on
loopback (a relay), and `in_node` runs a command inside (how a test reaches a pod, the agent's
port or a guest)."""

import hashlib
import os
import subprocess
from pathlib import Path

from formation_vmm.devcluster import libvirtd_image, operator_image, pause_image
from formation_vmm.devcluster.cluster import source_root
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.kube_node import KubeNode
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.processes import ProcessTable, netns_argv

NODE = "node-k"
# The install steps users run (README, "Install on a cluster"), word for word, from the
# repository's root: the node tier, `vmm dev up --kubelet` and the CI workflow on kind run them
# (tests/charts/test_workflow.py holds the workflow to them). A node adds only where its host
# paths and libvirtd's socket are (`chart_values`).
HELM_INSTALL = (
    "helm install formation-vmm charts/formation-vmm -n formation-vmm --create-namespace"
    " -f charts/formation-vmm/ci/tcg-values.yaml"
)
HELM_UPGRADE = (
    "helm upgrade formation-vmm charts/formation-vmm -n formation-vmm"
    " -f charts/formation-vmm/ci/tcg-values.yaml"
)
LABEL_NODE = "kubectl label node {node} vmm.formation.cloud/hypervisor=true"
APPLY_SAMPLE = "kubectl apply -f manifests/examples/vm-sample.yaml"
SAMPLE_FILES = "python3 -m formation_vmm.devcluster.guest {images} sample"
NAMESPACE = "formation-vmm"


class NodeClusterError(RuntimeError):
    pass


class NodeCluster:
    def __init__(self, root: Path, bins: Path, node: str = NODE, chart_libvirtd: bool = False) -> None:
        self.root = root
        self.bins = bins
        self.chart_libvirtd = chart_libvirtd
        self.netns = "vmm-" + hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
        self.processes = ProcessTable(root / "node-pids.json")
        self.node = KubeNode(root / "node", node, self.netns, self.processes)
        self.libvirt = LibvirtNode(root / "libvirt", node, self.processes, netns=self.netns)
        self.plane = ControlPlane(root / "plane", bins, netns=self.netns, node_ip=self.node.node_ip)
        self.host = root / "host"  # the node's host paths, as the chart's values name them

    @property
    def kubeconfig(self) -> Path:
        return self.plane.kubeconfig

    def start(self) -> None:
        """Everything, from nothing; the images are built first (or found in the cache)."""
        images = [
            (pause_image.build(), pause_image.NAME),
            (operator_image.build(), operator_image.image_name()),
        ]
        if self.chart_libvirtd:
            images.append((libvirtd_image.build(), libvirtd_image.image_name()))
        self.node.make_network()
        try:
            self.plane.start()
            if not self.chart_libvirtd:
                self.libvirt.start()
            self.node.start(self.bins, self.plane, images)
        except BaseException:
            self.stop()
            raise

    def chart_values(self) -> list[str]:
        """`helm install` arguments for this node, beside the chart's ci/tcg-values.yaml (the
        image as imported, QEMU's TCG): the node's host paths, and its libvirtd: its own, which
        runs QEMU as root and so needs the development switch, or the chart's."""
        h = self.host
        sets = (
            {
                "libvirtd.enabled": "true",
                "libvirtd.runDir": str(h / "libvirt-run"),
                "libvirtd.stateDir": str(h / "libvirt"),
            }
            if self.chart_libvirtd
            else {"agent.libvirtSocketDir": str(self.libvirt.sock_dir), "agent.allowUnconfinedQemu": "true"}
        )
        sets |= {
            "agent.vmDir": str(h / "form-vm"),
            "agent.disksDir": str(h / "vm-disks"),
            "agent.imagesDir": str(h / "vm-images"),
            "agent.imageCacheDir": str(h / "image-cache"),
            "agent.stateDir": str(h / "agent"),
        }
        return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]

    def run(self, step: str, *extra: str, **fields: str) -> str:
        """One of the install steps above (kubectl or helm from the cluster's binaries, with its
        kubeconfig; python3 with the repository's package), run from the repository's root."""
        argv = step.format(**fields).split() + list(extra)
        env = {**os.environ, "PYTHONPATH": str(source_root() / "operator")}
        if argv[0] in ("kubectl", "helm"):
            argv = [str(self.bins / argv[0]), f"--kubeconfig={self.kubeconfig}", *argv[1:]]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=source_root(), env=env, check=False)  # noqa: S603
        if done.returncode != 0:
            raise NodeClusterError(f"{step.format(**fields)} failed: {done.stderr.strip()}")
        return done.stdout

    def install(self, *extra: str) -> None:
        """The README's steps on this node: label it, the sample's kernel files onto it, then
        `helm install` with its paths."""
        self.run(LABEL_NODE, node=self.node.name)
        self.run(SAMPLE_FILES, images=str(self.host / "vm-images"))
        self.run(HELM_INSTALL, *self.chart_values(), *extra)

    def in_node(self, *argv: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
        """Run ``argv`` inside the cluster's network namespace (this machine's files)."""
        return subprocess.run(  # noqa: S603 - argv from the caller, no shell
            netns_argv(self.netns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop(self) -> None:
        """Pods and the kubelet first (so nothing restarts what goes), the guests with their
        libvirtd, then the control plane and the namespace."""
        self.node.stop()  # the chart's libvirtd, if it runs, and its guests with it
        if not self.chart_libvirtd:
            self.libvirt.stop()
        self.plane.stop()
        self.node.remove_network()
