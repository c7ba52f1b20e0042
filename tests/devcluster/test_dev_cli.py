"""`vmm dev up|status|down` as a user runs them: a second `up` is harmless, `down` leaves no
process behind, and `up` after a crash (processes killed, state left) works; after a crash of
the agent and the controller, `down` still removes the guests, and `up` leaves alone domains
the dev cluster did not create."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from formation_vmm.devcluster.cluster import Kubectl
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.local import node_names
from formation_vmm.devcluster.processes import alive
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


def vmm(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "formation_vmm.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def dev_env(tmp_path: Path) -> dict[str, str]:
    # test:/// keeps this test independent of libvirtd; the real-guest path is tested elsewhere.
    return {**os.environ, "VMM_DEV_DIR": str(tmp_path / "dev"), "VMM_LIBVIRT_URI": "test:///default"}


def test_up_status_up_again_down(dev_env: dict[str, str]) -> None:
    root = Path(dev_env["VMM_DEV_DIR"])
    try:
        up = vmm(dev_env, "dev", "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export KUBECONFIG={root / 'kubeconfig'}" in up.stdout
        # The test driver runs no guest: the sample is the VM with a blank disk.
        assert "blank" in up.stdout and "Running" in up.stdout
        header = next(line for line in up.stdout.splitlines() if line.startswith("NAMESPACE"))
        assert header.split() == [
            "NAMESPACE",
            "NAME",
            "PHASE",
            "NODE",
            "IP",
            "CPUS",
            "MEMORY",
            "READY",
            "AGE",
        ]

        pids = ControlPlane(root).processes.read()
        assert set(pids) >= {"etcd", "kube-apiserver", "kube-controller-manager", "controller"}

        status = vmm(dev_env, "dev", "status")
        assert status.returncode == 0 and "blank" in status.stdout

        again = vmm(dev_env, "dev", "up")
        assert again.returncode == 0 and "already running" in again.stdout
        assert ControlPlane(root).processes.read() == pids  # nothing restarted, nothing doubled

        down = vmm(dev_env, "dev", "down")
        assert down.returncode == 0
        assert not any(alive(pid) for pid in pids.values())
        assert vmm(dev_env, "dev", "status").returncode == 1
    finally:
        vmm(dev_env, "dev", "down")


def test_up_after_a_crash(dev_env: dict[str, str]) -> None:
    root = Path(dev_env["VMM_DEV_DIR"])
    try:
        assert vmm(dev_env, "dev", "up", "--no-sample").returncode == 0
        old = ControlPlane(root).processes.read()
        for pid in old.values():  # a crash: everything dies, the state files stay
            os.killpg(pid, signal.SIGKILL)
        up = vmm(dev_env, "dev", "up", "--no-sample")
        assert up.returncode == 0, up.stdout + up.stderr
        new = ControlPlane(root).processes.read()
        assert all(alive(pid) for pid in new.values())
        assert set(new.values()).isdisjoint(old.values())
    finally:
        vmm(dev_env, "dev", "down")


def qemu_pid(root: Path, node: str, domain: str) -> int:
    pidfile = root / "nodes" / node / "libvirt" / "run" / "qemu" / f"{domain}.pid"
    return int(pidfile.read_text().strip())


def test_two_nodes_and_down_after_a_crash_still_removes_the_guests() -> None:
    """`up --nodes 2`: two Nodes, each with a libvirtd, a network namespace and an agent of its
    own; a VM placed on either runs under that node's libvirtd only. After a crash of the
    controller and both agents, `down` still removes every guest and namespace."""
    env = {k: v for k, v in os.environ.items() if k != "VMM_LIBVIRT_URI"}
    # Short, as a user's default is: each node's libvirtd binds sockets under it, and pytest's
    # tmp_path with a node named <hostname>-2 can pass Linux's limit on a socket's path.
    short = Path(tempfile.mkdtemp(prefix="vmm-dev-", dir="/tmp"))
    env["VMM_DEV_DIR"] = str(short / "dev")
    root = Path(env["VMM_DEV_DIR"])
    nodes = node_names(2)
    try:
        up = vmm(env, "dev", "up", "--nodes", "2")  # the sample VM boots a real guest
        assert up.returncode == 0, up.stdout + up.stderr
        # On the default network, in its node's own network namespace, Ready through its probe.
        row = next(line.split() for line in up.stdout.splitlines() if line.startswith("default "))
        assert row[2] == "Running" and row[4].startswith("10.123.") and row[7] == "True", row
        sample_node = row[3]
        other = next(n for n in nodes if n != sample_node)
        kubectl = Kubectl(ControlPlane(root).binaries() / "kubectl", root / "kubeconfig")
        assert set(kubectl("get", "nodes", "-o", "name").split()) == {f"node/{n}" for n in nodes}
        vm = {
            "apiVersion": "vmm.formation.cloud/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": "there", "namespace": "default"},
            "spec": {
                "cpus": 1,
                "memory": "64Mi",
                "disks": [{"name": "d", "size": "1Mi"}],
                "nodeSelector": {"kubernetes.io/hostname": other},
            },
        }
        kubectl("apply", "-f", "-", input_text=yaml.safe_dump(vm))
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "--timeout=90s", "vm/there")
        guests = {
            sample_node: qemu_pid(root, sample_node, "default_sample"),
            other: qemu_pid(root, other, "default_there"),
        }
        assert all(alive(pid) for pid in guests.values())
        # Each node's libvirtd holds its own domain and not the other's.
        assert not (root / "nodes" / other / "libvirt" / "run" / "qemu" / "default_sample.pid").exists()
        assert not (root / "nodes" / sample_node / "libvirt" / "run" / "qemu" / "default_there.pid").exists()
        table = ControlPlane(root).processes
        namespaces = [LibvirtNode(root / "nodes" / n / "libvirt", n, table).netns_path() for n in nodes]
        assert len(set(namespaces)) == 2 and all(ns.exists() for ns in namespaces)
        pids = table.read()
        for name in ("controller", *(f"agent-{n}" for n in nodes)):  # a crash of all three
            os.killpg(pids[name], signal.SIGKILL)
        down = vmm(env, "dev", "down")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not any(alive(pid) for pid in guests.values())  # no guest outlived the cluster
        assert not any(alive(pid) for pid in pids.values())
        assert not (root / "nodes").exists()
        assert not any(ns.exists() for ns in namespaces)
    finally:
        vmm(env, "dev", "down")
        shutil.rmtree(short, ignore_errors=True)


def test_up_stops_when_one_node_cannot_have_a_libvirtd() -> None:
    """A dev directory whose length lets the first node's libvirtd bind its sockets and not the
    second's (named two bytes longer): `up` once gave that node libvirt's test driver and went
    on, a cluster where VMs on one node never really ran. It stops, says why, and leaves
    nothing running."""
    first = node_names(2)[0]
    # <dev>/nodes/<node>/libvirt/sock/libvirt-admin-sock: exactly Linux's 107 bytes for the first.
    length = 107 - len("/nodes/") - len(first) - len("/libvirt/sock/libvirt-admin-sock")
    base = Path(tempfile.mkdtemp(prefix="vmm-", dir="/tmp"))
    dev = base / ("d" * (length - len(str(base)) - 1))
    env = {k: v for k, v in os.environ.items() if k != "VMM_LIBVIRT_URI"}
    env["VMM_DEV_DIR"] = str(dev)
    try:
        assert len(str(dev)) == length, "this machine's hostname leaves no room for the case"
        up = vmm(env, "dev", "up", "--nodes", "2", "--no-sample")
        assert up.returncode == 1, up.stdout + up.stderr
        assert "a UNIX socket's path may have 107" in up.stdout, up.stdout
        assert "the nodes' libvirts differ (qemu, test)" in up.stdout or "(kvm, test)" in up.stdout, up.stdout
        table = ControlPlane(dev).processes.read()
        assert not any(alive(pid) for pid in table.values()), table
        assert not (dev / "nodes").exists()
    finally:
        vmm(env, "dev", "down")
        shutil.rmtree(base, ignore_errors=True)


def test_nodes_must_be_a_small_positive_number(tmp_path: Path) -> None:
    env = {**os.environ, "VMM_DEV_DIR": str(tmp_path / "dev")}
    for bad in ("0", "-1", "many", "17"):
        done = vmm(env, "dev", "up", "--nodes", bad)
        assert done.returncode == 2 and "--nodes" in done.stderr, done.stderr
    done = vmm(env, "dev", "up", "--kubelet", "--nodes", "2")
    assert done.returncode == 2 and "--kubelet makes one node" in done.stderr, done.stderr
    done = vmm({**env, "VMM_LIBVIRT_URI": "qemu:///system"}, "dev", "up", "--nodes", "2")
    assert done.returncode == 2 and "needs one per node: unset it" in done.stdout, done.stdout
    assert not (tmp_path / "dev").exists()  # refused before anything started


def test_up_after_a_crash_removes_its_own_leftovers_and_nothing_else(
    tmp_path: Path, qemu_node: LibvirtNode
) -> None:
    """On a libvirtd the dev cluster shares (here the test's own node libvirtd), a crashed dev
    cluster's domain is removed by the next `up`; a domain someone else made is left alone."""
    env = {**os.environ, "VMM_DEV_DIR": str(tmp_path / "dev"), "VMM_LIBVIRT_URI": qemu_node.uri}
    root = Path(env["VMM_DEV_DIR"])
    stranger = f"stranger-{uuid.uuid4().hex[:6]}"
    xml = tmp_path / "stranger.xml"
    xml.write_text(
        f"<domain type='qemu'><name>{stranger}</name><memory unit='MiB'>32</memory>"
        "<metadata><vmm:owner xmlns:vmm='https://vmm.formation.cloud/domain'>"
        f"<vmm:namespace>default</vmm:namespace><vmm:name>x</vmm:name><vmm:uid>{uuid.uuid4()}</vmm:uid>"
        "</vmm:owner></metadata><os><type arch='x86_64'>hvm</type></os>"
        f"<devices><serial type='file'><source path='{tmp_path / 'elsewhere.log'}'/></serial></devices>"
        "</domain>"
    )
    virsh = ["virsh", "-c", qemu_node.uri]
    subprocess.run([*virsh, "define", str(xml)], check=True, capture_output=True)
    try:
        assert vmm(env, "dev", "up", "--no-sample").returncode == 0
        kubectl = Kubectl(ControlPlane(root).binaries() / "kubectl", root / "kubeconfig")
        vm = {
            "apiVersion": "vmm.formation.cloud/v1alpha1",
            "kind": "VirtualMachine",
            "metadata": {"name": "left", "namespace": "default"},
            "spec": {"cpus": 1, "memory": "64Mi", "disks": [{"name": "d", "size": "1Mi"}]},
        }
        kubectl("apply", "-f", "-", input_text=yaml.safe_dump(vm))
        kubectl("wait", "--for=jsonpath={.status.phase}=Running", "--timeout=90s", "vm/left")

        def listed() -> str:
            return subprocess.run(
                [*virsh, "list", "--all", "--name"], capture_output=True, text=True, check=True
            ).stdout

        assert "default_left" in listed()
        for pid in ControlPlane(root).processes.read().values():  # everything dies
            os.killpg(pid, signal.SIGKILL)
        info = json.loads((root / "info.json").read_text())
        assert info["libvirt_uri"] == qemu_node.uri
        up = vmm(env, "dev", "up", "--no-sample")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "removed domain default_left" in up.stdout
        wait_for(lambda: "default_left" not in listed(), 30, "the crashed cluster's domain to go")
        assert stranger in listed()
    finally:
        vmm(env, "dev", "down")
        subprocess.run([*virsh, "undefine", stranger], capture_output=True, check=False)
