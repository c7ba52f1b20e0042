"""Invalid manifests are rejected by the real apiserver with a message a user understands."""

import json
from pathlib import Path

import pytest
import yaml

from formation_vmm.devcluster.cluster import Kubectl

pytestmark = pytest.mark.controlplane

VM = {"apiVersion": "vmm.formation.cloud/v1alpha1", "kind": "VirtualMachine"}
IMG = {"apiVersion": "vmm.formation.cloud/v1alpha1", "kind": "VmImage"}
SNAP = {"apiVersion": "vmm.formation.cloud/v1alpha1", "kind": "VmSnapshot"}
RESTORE = {"apiVersion": "vmm.formation.cloud/v1alpha1", "kind": "VmRestore"}
HEX = "a" * 64

INVALID = [
    (
        "negative cpus",
        VM,
        {"cpus": -2},
        "spec.cpus: Invalid value: -2: spec.cpus in body should be greater than or equal to 1",
    ),
    (
        "memory lots",
        VM,
        {"memory": "lots"},
        "memory must be a positive Kubernetes quantity such as 512Mi or 4Gi",
    ),
    ("zero memory", VM, {"memory": "0"}, "memory must be a positive Kubernetes quantity"),
    (
        "duplicate disk names",
        VM,
        {"disks": [{"name": "root", "size": "1Gi"}, {"name": "root", "size": "2Gi"}]},
        "disk names must be unique within a VM",
    ),
    ("unknown runStrategy", VM, {"runStrategy": "Sometimes"}, 'Unsupported value: "Sometimes"'),
    (
        "disk with neither",
        VM,
        {"disks": [{"name": "root"}]},
        "a disk needs an image (a VmImage name) or a size",
    ),
    (
        "disk name not a label",
        VM,
        {"disks": [{"name": "Root_Disk", "size": "1Gi"}]},
        "must be a DNS-1123 label",
    ),
    (
        "cpu and cpus",
        VM,
        {"cpus": 2, "cpu": {"cores": 2}},
        "set either cpu (sockets, cores, threads) or cpus, not both",
    ),
    (
        "blank disk size",
        VM,
        {"disks": [{"name": "d", "size": "big"}]},
        "size must be a positive Kubernetes quantity",
    ),
    (
        "image with two sources",
        IMG,
        {"source": {"http": {"url": "https://example.com/a.img"}, "hostPath": {"path": "a.img"}}},
        "an image source needs exactly one of http or hostPath",
    ),
    ("image with no source", IMG, {"source": {}}, "an image source needs exactly one of http or hostPath"),
    (
        "checksum not sha256",
        IMG,
        {"source": {"hostPath": {"path": "a.img"}}, "checksum": "md5:abc"},
        "checksum must be 'sha256:' followed by 64 lower-case hex digits",
    ),
    (
        "ftp url",
        IMG,
        {"source": {"http": {"url": "ftp://example.com/a.img"}}},
        "url must be an http:// or https:// URL",
    ),
    (
        "hostPath escaping",
        IMG,
        {"source": {"hostPath": {"path": "../etc/shadow"}}},
        "path must be relative to the images directory, with no component starting with '.'",
    ),
    (
        "hostPath to a hidden directory",
        IMG,
        {"source": {"hostPath": {"path": ".cache/blobs/x.raw"}}},
        "no component starting with '.'",
    ),
    (
        "grace period of a day",
        VM,
        {"terminationGracePeriodSeconds": 86400},
        "should be less than or equal to 3600",
    ),
    (
        "control character in the kernel command line",
        VM,
        {"kernel": {"image": "k", "cmdline": "console=ttyS0\u0000init=/bin/sh"}},
        "the kernel command line must be printable text",
    ),
    (
        "escape in the kernel command line",
        VM,
        {"kernel": {"image": "k", "cmdline": "quiet\u001b[2J"}},
        "the kernel command line must be printable text",
    ),
    (
        "a host bridge",
        VM,
        {"networks": [{"name": "eth0", "bridge": "br-mgmt"}]},
        "a VM cannot attach to a host bridge",
    ),
    (
        "secure boot without UEFI",
        VM,
        {"firmware": {"secureBoot": True}},
        "secureBoot needs firmware type: efi",
    ),
    ("firmware of another kind", VM, {"firmware": {"type": "coreboot"}}, 'supported values: "bios", "efi"'),
    ("memory past the limit", VM, {"memory": "32Ti"}, "memory must be at most 16Ti"),
    # CEL's isQuantity() alone makes the apiserver time out on this one: refused by pattern.
    ("memory of a googol", VM, {"memory": "1e999999999"}, "memory must be a positive Kubernetes quantity"),
    ("a disk of a googol", VM, {"disks": [{"name": "d", "size": "1e999999999"}]}, "size must be a positive"),
    (
        "a disk past the limit",
        VM,
        {"disks": [{"name": "d", "size": "100Ti"}]},
        "a disk must be at most 64Ti",
    ),
    (
        "liveness probe of two kinds",
        VM,
        {"livenessProbe": {"tcpSocket": {"port": 22}, "guestAgentPing": {}}},
        "a probe needs exactly one of tcpSocket, httpGet or guestAgentPing",
    ),
    (
        "http probe path with a header in it",
        VM,
        {"readinessProbe": {"httpGet": {"port": 80, "path": "/x HTTP/1.0\r\nHost: evil"}}},
        "spec.readinessProbe.httpGet.path in body should match",
    ),
    ("snapshot of no VM", SNAP, {"includeMemory": True}, "spec.vmName: Required value"),
    ("restore from no snapshot", RESTORE, {"vmName": "web"}, "spec.snapshotName: Required value"),
    (
        "unknown format",
        IMG,
        {"source": {"hostPath": {"path": "a"}}, "format": "iso"},
        'Unsupported value: "iso"',
    ),
]


def rejection(kubectl: Kubectl, verb: str, doc: dict[str, object]) -> str:
    """What the apiserver says when it refuses ``doc``; fails the test if it is accepted."""
    proc = kubectl.run(verb, "-f", "-", input_text=yaml.safe_dump(doc))
    assert proc.returncode != 0, f"accepted: {doc}"
    return proc.stderr


@pytest.mark.parametrize(("case", "head", "spec", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_rejected(
    kubectl: Kubectl, ns: str, case: str, head: dict[str, str], spec: dict[str, object], message: str
) -> None:
    doc = {**head, "metadata": {"name": "bad", "namespace": ns}, "spec": spec}
    assert message in rejection(kubectl, "create", doc)


def test_a_valid_vm_is_accepted_with_defaults(kubectl: Kubectl, ns: str) -> None:
    doc = {
        **VM,
        "metadata": {"name": "ok", "namespace": ns},
        "spec": {"disks": [{"name": "d", "size": "1Gi"}]},
    }
    kubectl("create", "-f", "-", input_text=yaml.safe_dump(doc))
    got = json.loads(kubectl("get", "vm", "ok", "-n", ns, "-o", "json"))
    assert got["spec"]["runStrategy"] == "Always"
    assert got["spec"]["memory"] == "512Mi"
    assert got["spec"]["disks"][0]["bus"] == "virtio"


def test_a_disk_image_cannot_change(kubectl: Kubectl, ns: str) -> None:
    doc = {
        **VM,
        "metadata": {"name": "img", "namespace": ns},
        "spec": {"disks": [{"name": "root", "image": "a"}]},
    }
    kubectl("create", "-f", "-", input_text=yaml.safe_dump(doc))
    doc["spec"] = {"disks": [{"name": "root", "image": "b"}]}
    assert "a disk's image cannot change once the VM exists" in rejection(kubectl, "apply", doc)


def test_kubectl_explain_helps(kubectl: Kubectl) -> None:
    out = kubectl("explain", "vm.spec.memory")
    assert "Guest memory as a Kubernetes quantity" in out


def test_a_disk_can_grow_but_not_shrink(kubectl: Kubectl, ns: str) -> None:
    doc = {
        **VM,
        "metadata": {"name": "grow", "namespace": ns},
        "spec": {"disks": [{"name": "root", "image": "a", "size": "2Gi"}, {"name": "data", "size": "1Gi"}]},
    }
    kubectl("create", "-f", "-", input_text=yaml.safe_dump(doc))
    doc["spec"] = {"disks": [{"name": "root", "image": "a", "size": "1Gi"}, {"name": "data", "size": "1Gi"}]}
    assert "a disk can grow but never shrink" in rejection(kubectl, "apply", doc)
    doc["spec"] = {
        "disks": [{"name": "root", "image": "a", "size": "3Gi"}, {"name": "data", "size": "2048Mi"}]
    }
    kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))


def test_snapshots_and_restores_cannot_be_changed(kubectl: Kubectl, ns: str) -> None:
    snap = {**SNAP, "metadata": {"name": "s", "namespace": ns}, "spec": {"vmName": "a"}}
    kubectl("create", "-f", "-", input_text=yaml.safe_dump(snap))
    snap["spec"] = {"vmName": "b"}
    assert "a snapshot cannot be changed" in rejection(kubectl, "apply", snap)
    restore = {
        **RESTORE,
        "metadata": {"name": "r", "namespace": ns},
        "spec": {"vmName": "a", "snapshotName": "s"},
    }
    kubectl("create", "-f", "-", input_text=yaml.safe_dump(restore))
    restore["spec"] = {"vmName": "a", "snapshotName": "t"}
    assert "a restore cannot be changed" in rejection(kubectl, "apply", restore)


def test_the_example_manifests_are_valid(kubectl: Kubectl) -> None:
    examples = Path(__file__).parents[2] / "manifests" / "examples"
    paths = sorted(examples.glob("*.yaml"))
    assert len(paths) >= 4
    for path in paths:
        kubectl("apply", "--dry-run=server", "-f", str(path))  # nothing is stored


NET = {"apiVersion": "vmm.formation.cloud/v1alpha1", "kind": "VmNetwork"}
INVALID_NETWORKS = [
    (
        "no subnet",
        {"mode": "nat"},
        "mode bridge needs bridge (and no subnet); modes nat and isolated need subnet",
    ),
    (
        "bridge without mode",
        {"mode": "nat", "subnet": "10.9.0.0/24", "bridge": "br0"},
        "mode bridge needs bridge",
    ),
    (
        "not a cidr",
        {"mode": "nat", "subnet": "10.9.0.0"},
        "subnet must be an IPv4 CIDR such as 10.123.0.0/16",
    ),
    ("ipv6", {"mode": "isolated", "subnet": "fd00::/64"}, "subnet must be an IPv4 CIDR"),
    ("host bits", {"mode": "nat", "subnet": "10.9.0.5/24"}, "subnet must name the network address"),
    ("too big", {"mode": "nat", "subnet": "10.0.0.0/8"}, "subnet must be between a /16 and a /29"),
    (
        "range outside",
        {"mode": "nat", "subnet": "10.9.0.0/24", "dhcpRange": {"start": "10.9.0.10", "end": "10.9.1.10"}},
        "dhcpRange.start and dhcpRange.end must be IPv4 addresses inside subnet",
    ),
    (
        "range backwards",
        {"mode": "nat", "subnet": "10.9.0.0/24", "dhcpRange": {"start": "10.9.0.200", "end": "10.9.0.10"}},
        "dhcpRange.start must not come after dhcpRange.end",
    ),
    ("bad bridge name", {"mode": "bridge", "bridge": "br0; rm -rf /"}, "spec.bridge in body should match"),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID_NETWORKS, ids=[c[0] for c in INVALID_NETWORKS])
def test_invalid_networks_are_rejected(
    kubectl: Kubectl, case: str, spec: dict[str, object], message: str
) -> None:
    assert message in rejection(kubectl, "create", {**NET, "metadata": {"name": "bad-net"}, "spec": spec})


def test_a_network_name_must_be_a_label_and_its_shape_cannot_change(kubectl: Kubectl) -> None:
    bad = {**NET, "metadata": {"name": "Not.A.Label"}, "spec": {"mode": "isolated", "subnet": "10.9.9.0/24"}}
    assert "a VmNetwork's name must be a DNS-1123 label" in rejection(kubectl, "create", bad)
    doc = {**NET, "metadata": {"name": "shape-test"}, "spec": {"mode": "isolated", "subnet": "10.9.8.0/24"}}
    kubectl("create", "-f", "-", input_text=yaml.safe_dump(doc))
    try:
        moved = {**doc, "spec": {"mode": "isolated", "subnet": "10.9.7.0/24"}}
        assert "subnet cannot change" in rejection(kubectl, "apply", moved)
        natted = {**doc, "spec": {"mode": "nat", "subnet": "10.9.8.0/24"}}
        assert "mode cannot change" in rejection(kubectl, "apply", natted)
        selected = {**doc, "spec": {**doc["spec"], "namespaceSelector": {"matchLabels": {"a": "b"}}}}  # type: ignore[dict-item]
        kubectl("apply", "-f", "-", input_text=yaml.safe_dump(selected))  # who may use it can change
    finally:
        kubectl("delete", "vmnetwork", "shape-test", check=False)
