"""Pure parts of image handling: magic bytes, bundle names and manifests, qemu-img's verdicts."""

import json

import pytest

from formation_vmm.host.disk_info import DiskInfo, parse_info
from formation_vmm.images.formats import (
    ImageRefusedError,
    compression_of,
    parse_manifest,
    progress_text,
    qcow2_backing_name,
    safe_member_name,
)

pytestmark = pytest.mark.pure


def test_compression_comes_from_the_bytes() -> None:
    assert compression_of(b"\x1f\x8b\x08\x00") == "gzip"
    assert compression_of(b"\xfd7zXZ\x00\x00") == "xz"
    assert compression_of(b"QFI\xfb\x00\x00") is None


@pytest.mark.parametrize("name", ["disk.img", "dir/disk.qcow2", "manifest.json"])
def test_plain_member_names_pass(name: str) -> None:
    assert safe_member_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "C:\\x", "é", "a\nb"]
)
def test_unsafe_member_names_are_refused(name: str) -> None:
    with pytest.raises(ImageRefusedError) as err:
        safe_member_name(name)
    assert err.value.reason == "UnsafeBundle"


def test_manifest_fields_are_checked_with_a_message() -> None:
    good = {"formatVersion": 1, "disk": "disk.img", "format": "raw", "minCpus": 2, "minMemory": "1Gi"}
    parsed = parse_manifest(json.dumps(good).encode())
    assert (parsed.disk, parsed.format, parsed.min_cpus, parsed.min_memory) == ("disk.img", "raw", 2, "1Gi")
    for change, words in [
        ({"formatVersion": 2}, "formatVersion"),
        ({"format": "vdi"}, "'format'"),
        ({"checksum": "md5:abc"}, "'checksum'"),
        ({"minCpus": 0}, "'minCpus'"),
        ({"disk": "../disk.img"}, "plain relative path"),
    ]:
        with pytest.raises(ImageRefusedError, match=words):
            parse_manifest(json.dumps({**good, **change}).encode())
    with pytest.raises(ImageRefusedError, match="not JSON"):
        parse_manifest(b"{nope")


def test_qemu_img_info_is_read_with_its_format_specific_block() -> None:
    info = parse_info(
        json.dumps(
            {
                "format": "qcow2",
                "virtual-size": 10,
                "backing-filename": "/etc/x",
                "format-specific": {"type": "qcow2", "data": {"data-file": "/dev/sda"}},
            }
        )
    )
    assert info == DiskInfo("qcow2", 10, 0, "/etc/x", {"data-file": "/dev/sda"})


def test_qcow2_header_backing_name() -> None:
    name = b"/var/lib/base.raw"
    header = bytearray(512)
    header[:4] = b"QFI\xfb"
    header[8:16] = (200).to_bytes(8, "big")
    header[16:20] = len(name).to_bytes(4, "big")
    header[200 : 200 + len(name)] = name
    assert qcow2_backing_name(bytes(header)) == name.decode()
    header[8:16] = bytes(8)
    assert qcow2_backing_name(bytes(header)) is None
    assert qcow2_backing_name(b"not a qcow2") is None


def test_progress_text() -> None:
    assert progress_text(50, 200) == "25%"
    assert progress_text(3 << 20, None) == "3.0MiB"
