"""A one-node Kubernetes cluster on this machine, as users run the product: a control plane
(with a scheduler and node lifecycle), a kubelet node with containerd, runc, CNI and kube-proxy
(kube_node.py), and the node's libvirtd (libvirt_node.py), all in one network namespace of the
cluster's own. The chart is installed on it with `helm install`; its pods run from the image
built here (operator_image.py), imported into the node's containerd.

The node's host paths for the chart (VM runtime files, disks, images, the agent's state) and
libvirtd's socket directory lie under the cluster's directory; `chart_values` gives the `--set`
arguments that point the chart there. Everything that needs a non-loopback address (the node,
the pods, the guests) lives in the namespace; from this machine, the apiserver answers on
loopback (a relay), and `in_node` runs a command inside (how a test reaches a pod, the agent's
port or a guest)."""

import hashlib
import subprocess
from pathlib import Path

from formation_vmm.devcluster import operator_image, pause_image
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.kube_node import KubeNode
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.processes import ProcessTable, netns_argv

NODE = "node-k"


class NodeCluster:
    def __init__(self, root: Path, bins: Path, node: str = NODE) -> None:
        self.root = root
        self.bins = bins
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
        self.node.make_network()
        try:
            self.plane.start()
            self.libvirt.start()
            self.node.start(self.bins, self.plane, images)
        except BaseException:
            self.stop()
            raise

    def chart_values(self) -> list[str]:
        """`helm install` arguments for this node, beside the chart's ci/tcg-values.yaml (the
        image as imported, QEMU's TCG): the node's host paths, and its libvirtd, which runs QEMU
        as root and so needs the development switch."""
        h = self.host
        sets = {
            "agent.libvirtSocketDir": str(self.libvirt.sock_dir),
            "agent.allowUnconfinedQemu": "true",
            "agent.vmDir": str(h / "form-vm"),
            "agent.disksDir": str(h / "vm-disks"),
            "agent.imagesDir": str(h / "vm-images"),
            "agent.imageCacheDir": str(h / "image-cache"),
            "agent.stateDir": str(h / "agent"),
        }
        return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]

    def in_node(self, *argv: str, timeout: float = 60) -> "subprocess.CompletedProcess[str]":
        """Run ``argv`` inside the cluster's network namespace (this machine's files)."""
        return subprocess.run(  # noqa: S603 - argv from the caller, no shell
            netns_argv(self.netns, argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop(self) -> None:
        """Pods and the kubelet first (so nothing restarts what goes), the guests with their
        libvirtd, then the control plane and the namespace."""
        self.node.stop()
        self.libvirt.stop()
        self.plane.stop()
        self.node.remove_network()
