"""What a file is, decided from its bytes and from ``qemu-img info``, never from its name. Pure."""

import json
import posixpath
import re
from dataclasses import dataclass
from typing import Any

GZIP_MAGIC = b"\x1f\x8b"
XZ_MAGIC = b"\xfd7zXZ\x00"
TAR_MAGIC_OFFSET = 257  # "ustar" in a POSIX tar header
MANIFEST_NAME = "manifest.json"
FORM_VERSION = 1
SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageRefusedError(ValueError):
    """An image this agent will not use; ``reason`` is one CamelCase word for conditions."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def compression_of(head: bytes) -> str | None:
    """'gzip' or 'xz' when the first bytes say so, else None."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(XZ_MAGIC):
        return "xz"
    return None


def is_vmdk_descriptor(head: bytes) -> bool:
    """A VMDK descriptor in a file of its own: text naming the files that hold the data."""
    return head.lstrip().startswith(b"# Disk DescriptorFile")


def is_tar(head: bytes) -> bool:
    return head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar"


def safe_member_name(name: str) -> str:
    """A ``.form`` member name: a plain relative path with no '..', no absolute path, no empty
    or '.' components, printable ASCII only."""
    if not name or name.startswith("/") or "\\" in name or not name.isascii() or not name.isprintable():
        raise ImageRefusedError("UnsafeBundle", f"bundle member name {name!r} is not a plain relative path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts) or posixpath.normpath(name) != name:
        raise ImageRefusedError("UnsafeBundle", f"bundle member name {name!r} is not a plain relative path")
    return name


@dataclass(frozen=True)
class FormManifest:
    """``manifest.json`` of a ``.form`` bundle; docs/images.md defines it."""

    disk: str
    format: str
    checksum: str | None
    min_cpus: int
    min_memory: str | None
    cmdline: str | None


def parse_manifest(raw: bytes) -> FormManifest:
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageRefusedError("InvalidBundle", f"manifest.json is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ImageRefusedError("InvalidBundle", "manifest.json must hold a JSON object")
    if data.get("formatVersion") != FORM_VERSION:
        raise ImageRefusedError(
            "InvalidBundle",
            f"manifest.json formatVersion must be {FORM_VERSION}, not {data.get('formatVersion')!r}",
        )
    disk = data.get("disk")
    if not isinstance(disk, str):
        raise ImageRefusedError(
            "InvalidBundle", "manifest.json needs 'disk', the member name of the disk file"
        )
    fmt = data.get("format")
    if fmt not in ("raw", "qcow2", "vmdk"):
        raise ImageRefusedError("InvalidBundle", "manifest.json 'format' must be raw, qcow2 or vmdk")
    checksum = data.get("checksum")
    if checksum is not None and (not isinstance(checksum, str) or not SHA256.match(checksum)):
        raise ImageRefusedError("InvalidBundle", "manifest.json 'checksum' must be sha256:<64 hex digits>")
    min_cpus = data.get("minCpus", 1)
    if not isinstance(min_cpus, int) or isinstance(min_cpus, bool) or min_cpus < 1:
        raise ImageRefusedError("InvalidBundle", "manifest.json 'minCpus' must be a positive integer")
    min_memory = data.get("minMemory")
    if min_memory is not None and not isinstance(min_memory, str):
        raise ImageRefusedError("InvalidBundle", "manifest.json 'minMemory' must be a quantity such as 512Mi")
    cmdline = data.get("cmdline")
    if cmdline is not None and not isinstance(cmdline, str):
        raise ImageRefusedError("InvalidBundle", "manifest.json 'cmdline' must be a string")
    return FormManifest(safe_member_name(disk), fmt, checksum, min_cpus, min_memory, cmdline)


def qcow2_backing_name(header: bytes) -> str | None:
    """The backing file a qcow2 header names (for the cache's garbage collector), or None."""
    if len(header) < 20 or header[:4] != b"QFI\xfb":
        return None
    offset = int.from_bytes(header[8:16], "big")
    size = int.from_bytes(header[16:20], "big")
    if offset == 0 or size == 0 or offset + size > len(header):
        return None
    return header[offset : offset + size].decode("utf-8", "replace")


def progress_text(done: int, total: int | None) -> str:
    if total:
        return f"{min(100, done * 100 // total)}%"
    return f"{done / (1 << 20):.1f}MiB"
