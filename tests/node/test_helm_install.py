"""Installed as users install it: `helm install` of charts/formation-vmm onto a real node (a
kubelet with containerd, runc, CNI and kube-proxy: devcluster/node_cluster.py), from the image
built here without a container engine. The controller and agent pods run with the chart's
service accounts (projected, pod-bound tokens), security contexts and host paths, become Ready
through their probes, and the sample VM runs on real QEMU (TCG). Then what users do next:
`kubectl vm console`, `helm upgrade` (the agent rolls, the guest does not restart), and
`helm uninstall` (our objects go; CRDs and VMs stay, docs/configuration.md)."""

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from formation_vmm.api.names import MIGRATION_ENDPOINT_ANNOTATION
from formation_vmm.devcluster import operator_image
from formation_vmm.devcluster.node_cluster import APPLY_SAMPLE, HELM_UPGRADE, NodeCluster
from tests.support.binaries import binaries
from tests.support.cluster import open_to_qemu
from tests.support.node_pods import (
    all_ready,
    commands_naming,
    guest_boot_id,
    kubectl_of,
    pods,
    sample_running,
)
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.node

ROOT = Path(__file__).resolve().parents[2]
NS = "formation-vmm"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeCluster]:
    started = time.monotonic()
    root = tmp_path_factory.mktemp("node-cluster")
    # The node's own libvirtd reaches the VMs' files by their paths here: each VM's QEMU, as a
    # uid of its own, must get through (inside the agent's container those paths look open).
    open_to_qemu(root)
    c = NodeCluster(root, binaries())
    c.start()
    print(
        f"node cluster (plane, libvirtd, containerd, kubelet, kube-proxy): {time.monotonic() - started:.1f}s"
    )
    try:
        yield c
    finally:
        c.stop()


def qemu_pids(cluster: NodeCluster) -> set[int]:
    return {int(p.read_text()) for p in cluster.libvirt.root.glob("run/qemu/*.pid")}


def test_helm_install_runs_the_product_on_a_real_node(cluster: NodeCluster) -> None:
    kubectl = kubectl_of(cluster)
    started = time.monotonic()
    cluster.install()  # label the node, the sample's kernel files, helm install (README's steps)
    # Ready through their own probes: /readyz answers only once the API answered, a watch
    # delivered and (for the agent) libvirt answered.
    controllers = wait_for(lambda: all_ready(kubectl, "controller", 2), 180, "two controller pods Ready")
    agents = wait_for(lambda: all_ready(kubectl, "agent", 1), 180, "the agent pod Ready")
    print(f"helm install to pods Ready: {time.monotonic() - started:.1f}s")

    # As the chart runs them: its service accounts' projected tokens, no privilege.
    agent = get_json(kubectl, "pod", agents[0], "-n", NS)
    assert agent["spec"]["serviceAccountName"] == "formation-vmm-agent"
    assert agent["spec"]["hostNetwork"] is True
    assert any("projected" in v for v in agent["spec"]["volumes"])  # the pod-bound token
    ctx = agent["spec"]["containers"][0]["securityContext"]
    assert not ctx.get("privileged") and ctx["capabilities"]["drop"] == ["ALL"]
    controller = get_json(kubectl, "pod", controllers[0], "-n", NS)
    assert controller["spec"]["containers"][0]["securityContext"]["runAsUser"] == 65532
    # The agent runs the migration relay on the node's address, within those limits, and
    # publishes where it listens and the certificate it shows (docs/migration.md).
    published = wait_for(
        lambda: get_json(kubectl, "node", cluster.node.name)["metadata"]["annotations"].get(
            MIGRATION_ENDPOINT_ANNOTATION
        ),
        60,
        "the node's migration endpoint",
    )
    endpoint = json.loads(published)
    assert endpoint["relay"] == f"{cluster.node.node_ip}:9440"
    assert endpoint["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    # One leads: the Lease names a running replica.
    lease = get_json(kubectl, "lease", "formation-vmm-controller", "-n", NS)
    assert lease["spec"]["holderIdentity"] in controllers

    cluster.run(APPLY_SAMPLE)
    vm = wait_for(lambda: sample_running(kubectl), 180, "the sample VM Running")
    print(f"helm install to the sample VM Running: {time.monotonic() - started:.1f}s")
    address = vm["status"]["interfaces"][0]["ipAddress"]
    wait_for(lambda: cluster.in_node("curl", "-sf", "--max-time", "3", f"http://{address}/").returncode == 0,
             120, "the guest's HTTP server")  # fmt: skip
    boot_id = guest_boot_id(cluster, address)

    # The console through the apiserver: our APIService, proxied to a controller pod, which asks
    # the agent on the node's address over mutual TLS (the certificates the chart's pods made).
    console = cluster.in_node(
        "env", f"KUBECONFIG={cluster.kubeconfig}", str(ROOT / ".venv" / "bin" / "kubectl-vm"),
        "console", "sample", "--no-follow",
    )  # fmt: skip
    assert console.returncode == 0, console.stderr
    assert f"formation-vmm guest: address {address}/" in console.stdout

    # An upgrade that changes the agent's pod rolls it; the guest runs on untouched.
    pids = qemu_pids(cluster)
    assert pids
    cluster.run(HELM_UPGRADE, *cluster.chart_values(), "--set", "logLevel=DEBUG")
    rolled = wait_for(
        lambda: (now := all_ready(kubectl, "agent", 1)) and now != agents and now,
        180,
        "a new agent pod Ready",
    )
    env = get_json(kubectl, "pod", rolled[0], "-n", NS)["spec"]["containers"][0]["env"]
    assert {"name": "VMM_LOG_LEVEL", "value": "DEBUG"} in env
    still = get_json(kubectl, "vm", "sample", "-n", "default")
    assert still["status"]["phase"] == "Running"
    assert qemu_pids(cluster) == pids
    assert guest_boot_id(cluster, address) == boot_id

    # Uninstall: our objects go; the CRDs (Helm never deletes crds/) and the VMs stay, and the
    # guest keeps running, unmanaged, until an agent comes back or an admin removes it.
    cluster.run("helm uninstall formation-vmm -n formation-vmm", "--wait")
    assert kubectl("get", "deployment,daemonset,serviceaccount,networkpolicy,poddisruptionbudget", "-n", NS,
                   "-l", "app.kubernetes.io/instance=formation-vmm", "-o", "name").strip() == ""  # fmt: skip
    assert kubectl.run("get", "clusterrole", "formation-vmm-agent").returncode != 0
    kubectl("get", "crd", "virtualmachines.vmm.formation.cloud")
    assert get_json(kubectl, "vm", "sample", "-n", "default")["metadata"]["name"] == "sample"
    assert qemu_pids(cluster) == pids
    wait_for(lambda: get_json(kubectl, "pods", "-n", NS)["items"] == [], 120, "our pods gone")


def kustomize_overlay(cluster: NodeCluster, dest: Path) -> Path:
    """What a user with other host paths writes over manifests/: JSON patches of the agent's
    environment, mounts and host paths (each path the same inside and outside the pod, as the
    agent hands them to libvirtd), QEMU's TCG and this node's libvirtd."""
    agent = yaml.safe_load((ROOT / "manifests" / "base" / "agent.yaml").read_text())
    container = agent["spec"]["template"]["spec"]["containers"][0]
    h = cluster.host
    paths = {
        "/run/form-vm": h / "form-vm",
        "/var/lib/formation/vm-disks": h / "vm-disks",
        "/var/lib/formation/vm-images": h / "vm-images",
        "/var/lib/formation/image-cache": h / "image-cache",
        "/var/lib/formation/agent": h / "agent",
    }
    base = "/spec/template/spec/containers/0"
    ops: list[dict[str, object]] = []
    for i, env in enumerate(container["env"]):
        if env.get("value") in paths:
            ops.append({"op": "replace", "path": f"{base}/env/{i}/value", "value": str(paths[env["value"]])})
        if env["name"] == "VMM_DOMAIN_TYPE":
            ops.append({"op": "replace", "path": f"{base}/env/{i}/value", "value": "qemu"})
    ops.append(
        {
            "op": "add",
            "path": f"{base}/env/-",
            "value": {"name": "VMM_ALLOW_UNCONFINED_QEMU", "value": "true"},
        }
    )
    for i, mount in enumerate(container["volumeMounts"]):
        if mount["mountPath"] in paths:
            ops.append({"op": "replace", "path": f"{base}/volumeMounts/{i}/mountPath",
                        "value": str(paths[mount["mountPath"]])})  # fmt: skip
    for i, volume in enumerate(agent["spec"]["template"]["spec"]["volumes"]):
        host = volume.get("hostPath", {}).get("path")
        if host in paths or host == "/var/run/libvirt":
            new = paths.get(host, cluster.libvirt.sock_dir)
            ops.append(
                {"op": "replace", "path": f"/spec/template/spec/volumes/{i}/hostPath/path", "value": str(new)}
            )
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(ROOT / "manifests", dest)],
                "patches": [
                    {
                        "target": {"kind": "DaemonSet", "name": "formation-vmm-agent"},
                        "patch": yaml.safe_dump(ops),
                    }
                ],
            }
        )
    )
    return dest


def test_kubectl_apply_k_manifests_takes_over_the_running_vm(cluster: NodeCluster, tmp_path: Path) -> None:
    """After the chart is gone (the test above), `kubectl apply -k` of manifests/ (with the
    overlay a user writes for other host paths) runs the product again: its agent takes over
    the sample VM that kept running meanwhile, without restarting the guest."""
    kubectl = kubectl_of(cluster)
    vm = get_json(kubectl, "vm", "sample", "-n", "default")
    address = vm["status"]["interfaces"][0]["ipAddress"]
    pids, boot_id = qemu_pids(cluster), guest_boot_id(cluster, address)
    assert pids and not pods(kubectl, "agent")

    overlay = kustomize_overlay(cluster, tmp_path / "overlay")
    rendered = kubectl("kustomize", "--load-restrictor", "LoadRestrictionsNone", str(overlay))
    kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input_text=rendered)
    wait_for(lambda: all_ready(kubectl, "controller", 2), 180, "two controller pods Ready")
    wait_for(lambda: all_ready(kubectl, "agent", 1), 180, "the agent pod Ready")
    vm = wait_for(lambda: sample_running(kubectl, ready=True), 120, "the sample VM Ready under the new agent")
    assert qemu_pids(cluster) == pids
    assert guest_boot_id(cluster, address) == boot_id
    assert vm["status"]["nodeName"] == cluster.node.name


def test_a_node_stopped_with_pods_running_leaves_nothing_behind(tmp_path: Path) -> None:
    """Killed mid-test, with a pod running: stopping the node removes its processes, the pods'
    network namespaces and shim sockets (which containerd keeps outside the node's directory),
    the kubelet's mounts and the node's cgroups."""
    c = NodeCluster(tmp_path / "c", binaries())
    c.start()
    try:
        kubectl = kubectl_of(c)
        image = f"--image={operator_image.image_name()}"
        kubectl("run", "sleeper", image, "--image-pull-policy=Never", "--command", "--", "sleep", "600")
        kubectl("wait", "--for=condition=Ready", "pod/sleeper", "--timeout=90s")
        left = c.node._containers()
        netns = {Path(p).name for p in left.values() if "/netns/cni-" in p}
        assert netns, left
        mounts = [
            line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in line
        ]
        assert mounts  # the kubelet's: the pod's token and volumes
    finally:
        c.stop()
    assert not [n for n in netns if Path(f"/run/netns/{n}").exists()]
    assert not [
        line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(tmp_path) in line
    ]
    assert not list(Path("/sys/fs/cgroup/memory").glob(f"{c.netns}*"))
    assert not Path(f"/run/netns/{c.netns}").exists()
    assert not commands_naming(tmp_path)
