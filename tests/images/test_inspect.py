"""The inspector's table: every image shape whose metadata points outside itself is refused,
with its reason; the self-contained shapes pass. Pure (DiskInfo as qemu-img reports it; the
host tier checks the same shapes made by the real qemu-img, in test_refused_shapes.py)."""

from typing import Any

import pytest

from formation_vmm.host.disk_info import DiskInfo
from formation_vmm.images.formats import ImageRefusedError
from formation_vmm.images.inspect import inspect

pytestmark = pytest.mark.pure

PATH = "/cache/scratch/fetch.1.2"


def vmdk(create_type: str, extents: list[dict[str, Any]] | None = None, parent: int = 0xFFFFFFFF) -> DiskInfo:
    found = [{"filename": PATH, "virtual-size": 10}] if extents is None else extents
    return DiskInfo(
        "vmdk", 10, 10, None, {"create-type": create_type, "extents": found, "parent-cid": parent}
    )


def qcow2(**specific: Any) -> DiskInfo:
    return DiskInfo("qcow2", 10, 10, None, {"compat": "1.1", **specific})


PASS = [
    (DiskInfo("raw", 10, 10, None, {}), "auto"),
    (DiskInfo("raw", 10, 10, None, {}), "raw"),
    (qcow2(), "auto"),
    (qcow2(), "qcow2"),
    (qcow2(), "form"),
    (vmdk("monolithicSparse"), "auto"),
    (vmdk("streamOptimized"), "vmdk"),
]

REFUSED = [
    # A backing file could be any file of the node.
    (DiskInfo("qcow2", 10, 10, "/etc/shadow", {}), "auto", "BackingFileRefused"),
    (DiskInfo("qcow2", 10, 10, 'json:{"file": {"driver": "http"}}', {}), "auto", "BackingFileRefused"),
    # qcow2's external data file: the guest would read and write it.
    (
        qcow2(**{"data-file": "/var/run/secrets/kubernetes.io/serviceaccount/token"}),
        "auto",
        "ExternalDataRefused",
    ),
    # VMDK descriptors naming other files (OSSA-2024-001), and multi-file layouts.
    (
        vmdk("monolithicFlat", [{"filename": "/var/run/secrets/token", "format": "FLAT"}]),
        "auto",
        "ExternalExtentRefused",
    ),
    (vmdk("twoGbMaxExtentSparse", [{"filename": "disk-s001.vmdk"}]), "auto", "ExternalExtentRefused"),
    (vmdk("vmfs"), "auto", "ExternalExtentRefused"),
    (vmdk("monolithicSparse", [{"filename": "/etc/passwd"}]), "auto", "ExternalExtentRefused"),
    (
        vmdk("monolithicSparse", [{"filename": PATH}, {"filename": "/etc/passwd"}]),
        "auto",
        "ExternalExtentRefused",
    ),
    (vmdk("monolithicSparse", []), "auto", "ExternalExtentRefused"),
    (vmdk("monolithicSparse", [{"filename": "nbd://10.0.0.1/x"}]), "auto", "ExternalExtentRefused"),
    (vmdk("monolithicSparse", parent=1234), "auto", "BackingFileRefused"),
    # Formats qemu-img knows that we do not take, and a declared format that does not hold.
    (DiskInfo("vdi", 10, 10, None, {}), "auto", "UnsupportedFormat"),
    (DiskInfo("luks", 10, 10, None, {}), "auto", "UnsupportedFormat"),
    (qcow2(), "raw", "FormatMismatch"),
    (DiskInfo("raw", 10, 10, None, {}), "qcow2", "FormatMismatch"),
    (vmdk("monolithicSparse"), "qcow2", "FormatMismatch"),
]


@pytest.mark.parametrize(("info", "declared"), PASS)
def test_self_contained_images_pass(info: DiskInfo, declared: str) -> None:
    inspect(info, PATH, declared)


@pytest.mark.parametrize(("info", "declared", "reason"), REFUSED)
def test_images_pointing_outside_themselves_are_refused(info: DiskInfo, declared: str, reason: str) -> None:
    with pytest.raises(ImageRefusedError) as refused:
        inspect(info, PATH, declared)
    assert refused.value.reason == reason
    assert str(refused.value)  # a message a user can read
