"""`vmm dev up --kubelet` as a user runs it: a real node that brings nothing but the kernel, the
chart installed by helm with its own libvirtd (`libvirtd.enabled`, the libvirtd image built
here), and the sample VM Running on real QEMU (TCG) inside the chart's libvirtd pod, as the
unprivileged libvirt-qemu user. `helm upgrade` of values of both the agent and libvirtd rolls
the agent only: the libvirtd pod (OnDelete) and the guest run on. `status` lists the node's
processes; `down` leaves nothing of it behind."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from formation_vmm.api.names import QEMU_UID_ANNOTATION
from formation_vmm.devcluster import libvirtd_image
from formation_vmm.devcluster.node_cluster import HELM_UPGRADE, NAMESPACE, NodeCluster
from tests.support.binaries import binaries
from tests.support.node_pods import all_ready, commands_naming, guest_boot_id, kubectl_of, pods
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.node


def vmm(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "formation_vmm.cli", *args], env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip


def qemu_processes(root: Path) -> dict[int, tuple[int, set[int]]]:
    """QEMU processes of this cluster (their disks are under ``root``), by this machine's pid:
    their real uid and their groups."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            if cmdline.startswith(b"/usr/bin/qemu-system") and str(root).encode() in cmdline:
                status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
                groups = {int(g) for g in status["Groups"].split()}
                found[int(proc.name)] = (int(status["Uid"].split()[0]), groups)
        except OSError:
            continue
    return found


def check_the_chart_libvirtd(cluster: NodeCluster, root: Path) -> None:
    kubectl = kubectl_of(cluster)
    (libvirtd,) = pods(kubectl, "libvirtd")
    (agent,) = pods(kubectl, "agent")
    assert libvirtd["spec"]["containers"][0]["image"] == libvirtd_image.image_name()
    assert libvirtd["spec"]["containers"][0]["securityContext"]["privileged"] is True
    assert "livenessProbe" not in libvirtd["spec"]["containers"][0]
    container = agent["spec"]["containers"][0]
    assert not container["securityContext"].get("privileged")
    assert "VMM_ALLOW_UNCONFINED_QEMU" not in {e["name"] for e in container["env"]}
    # QEMU as the sample VM's own uid (qemu_uids.py), never root, in no group of root's; the
    # agent still accepts the libvirtd as confined (DAC with libvirt-qemu for VMs without one).
    qemus = qemu_processes(root)
    ((uid, groups),) = qemus.values()
    sample = get_json(kubectl, "vm", "sample", "-n", "default")
    assert uid == int(sample["metadata"]["annotations"][QEMU_UID_ANNOTATION]) != libvirtd_image.QEMU_UID
    assert 0 not in groups, groups

    vm = get_json(kubectl, "vm", "sample", "-n", "default")
    address = vm["status"]["interfaces"][0]["ipAddress"]
    wait_for(lambda: cluster.in_node("curl", "-sf", "--max-time", "3", f"http://{address}/").returncode == 0,
             120, "the guest's HTTP server")  # fmt: skip
    boot_id = guest_boot_id(cluster, address)

    # An upgrade that changes both pods' templates: the agent rolls, libvirtd is only marked out
    # of date (OnDelete), and the guest runs on.
    cluster.run(HELM_UPGRADE, *cluster.chart_values(), "--set", "logLevel=DEBUG",
                "--set", "libvirtd.resources.requests.cpu=150m")  # fmt: skip
    wait_for(
        lambda: (now := all_ready(kubectl, "agent", 1)) and now != [agent["metadata"]["name"]],
        180,
        "a new agent pod Ready",
    )
    daemonset = wait_for(
        lambda: (
            (d := get_json(kubectl, "daemonset", "formation-vmm-libvirtd", "-n", NAMESPACE))["status"].get(
                "observedGeneration"
            )
            == d["metadata"]["generation"]
            and d
        ),
        60,
        "the libvirtd DaemonSet's status of the upgrade",
    )
    assert daemonset["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "150m"
    assert daemonset["status"].get("updatedNumberScheduled", 0) == 0  # out of date, not replaced
    assert [p["metadata"]["uid"] for p in pods(kubectl, "libvirtd")] == [libvirtd["metadata"]["uid"]]
    assert qemu_processes(root) == qemus
    assert guest_boot_id(cluster, address) == boot_id
    assert get_json(kubectl, "vm", "sample", "-n", "default")["status"]["phase"] == "Running"


def test_dev_up_kubelet_with_the_charts_libvirtd(tmp_path_factory: pytest.TempPathFactory) -> None:
    # A short directory: containerd's socket path, under it, must stay within 104 bytes.
    root = tmp_path_factory.mktemp("dev")
    env = {**os.environ, "VMM_DEV_DIR": str(root), "VMM_BIN_DIR": str(binaries())}
    cluster = NodeCluster(root / "kubelet", binaries(), chart_libvirtd=True)
    try:
        up = vmm(env, "dev", "up", "--kubelet")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export KUBECONFIG={cluster.kubeconfig}" in up.stdout
        rows = [line.split() for line in up.stdout.splitlines()]
        sample = next(row for row in rows if row[:1] == ["default"] and row[1].endswith("/sample"))
        assert sample[2:4] == ["Running", "node-k"], up.stdout
        check_the_chart_libvirtd(cluster, root)
        status = vmm(env, "dev", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert "kubelet-node-k" in status.stdout and "containerd-node-k" in status.stdout
        pids = {**cluster.processes.read(), **cluster.plane.processes.read()}
        assert pids
    finally:
        down = vmm(env, "dev", "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not (root / "kubelet").exists()
    assert not Path(f"/run/netns/{cluster.netns}").exists()
    assert not qemu_processes(root)
    assert not commands_naming(root)
