"""Real image files for the tests, made with qemu-img, gzip, xz and tarfile."""

import gzip
import hashlib
import io
import json
import lzma
import subprocess
import tarfile
from pathlib import Path

MARKER = b"formation-vmm test image marker\n"
MIB = 1 << 20


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def raw(dest: Path, size: int = 2 * MIB, marker: bytes = MARKER) -> Path:
    """A raw disk with a marker at offset 0 (and some bytes further in, so it is not all zeros)."""
    with dest.open("wb") as f:
        f.truncate(size)
        f.write(marker)
        f.seek(size // 2)
        f.write(marker)
    return dest


def convert(src: Path, dest: Path, fmt: str) -> Path:
    qemu_img("convert", "-f", "raw", "-O", fmt, str(src), str(dest))
    return dest


def gz(src: Path, dest: Path) -> Path:
    dest.write_bytes(gzip.compress(src.read_bytes()))
    return dest


def xz(src: Path, dest: Path) -> Path:
    dest.write_bytes(lzma.compress(src.read_bytes()))
    return dest


def form(
    dest: Path,
    disk: Path,
    disk_format: str,
    manifest: dict[str, object] | None = None,
    extra: list[tarfile.TarInfo] | None = None,
    disk_member: str = "disk.img",
) -> Path:
    """A .form bundle: manifest.json and the disk, plus ``extra`` members (for the bad cases)."""
    body = manifest or {
        "formatVersion": 1,
        "disk": disk_member,
        "format": disk_format,
        "checksum": sha256(disk),
        "minCpus": 1,
        "minMemory": "64Mi",
    }
    with tarfile.open(dest, "w") as tar:
        data = json.dumps(body).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(disk, arcname=disk_member)
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    return dest


def with_backing(dest: Path, backing: Path) -> Path:
    qemu_img("create", "-f", "qcow2", "-F", "raw", "-b", str(backing), str(dest))
    return dest


def corrupt_qcow2(src_raw: Path, dest: Path) -> Path:
    """A qcow2 whose L1 table offset points past the end of the file."""
    convert(src_raw, dest, "qcow2")
    data = bytearray(dest.read_bytes())
    data[40:48] = (1 << 40).to_bytes(8, "big")  # l1_table_offset
    dest.write_bytes(bytes(data))
    return dest
