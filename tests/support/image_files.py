"""Real image files for the tests, made with qemu-img, gzip, xz and tarfile."""

import gzip
import hashlib
import io
import json
import lzma
import subprocess
import tarfile
import zlib
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


# --- Images made to attack the agent (tests/images/test_refused_images.py) ------------------


def vmdk_pointing_at(dest: Path, target: Path, size: int = 8 * 512) -> Path:
    """A VMDK descriptor whose one extent is a file of the node (OSSA-2024-001): converted, it
    would copy ``target`` into the image."""
    dest.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        'createType="monolithicFlat"\n\n'
        f'RW {size // 512} FLAT "{target}" 0\n\n'
        'ddb.virtualHWVersion = "4"\nddb.adapterType = "ide"\n'
    )
    return dest


def vmdk_split(dest: Path) -> Path:
    """A VMDK of several files (twoGbMaxExtentSparse): a descriptor naming its extents."""
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", str(dest), "4M")
    return dest


def qcow2_with_data_file(dest: Path, data_file: Path) -> Path:
    """A qcow2 whose clusters live in another file (qcow2's external data file)."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file}", str(dest), str(MIB))
    return dest


def qcow2_with_json_backing(dest: Path) -> Path:
    """A qcow2 whose backing file is a json: pseudo-filename naming a protocol driver."""
    qemu_img("create", "-q", "-f", "qcow2", str(dest), str(MIB))
    data = bytearray(dest.read_bytes())
    name = b'json:{"file": {"driver": "http", "url": "http://169.254.169.254/"}}'
    offset = 0x1000 - len(name) - 8
    data[8:16] = offset.to_bytes(8, "big")  # backing_file_offset
    data[16:20] = len(name).to_bytes(4, "big")  # backing_file_size
    data[offset : offset + len(name)] = name
    dest.write_bytes(bytes(data))
    return dest


def xz_bomb(dest: Path) -> Path:
    """A tiny .xz whose LZMA2 filter asks for a 4 GiB dictionary: an unpacker that honours it
    allocates 4 GiB before the first byte of output."""
    data = bytearray(lzma.compress(b"\0" * 4096, check=lzma.CHECK_CRC32))
    # Block header right after the 12-byte stream header: size byte, flags, then (no sizes
    # present) filter flags: id 0x21 (LZMA2), properties size 1, the dictionary-size code.
    start = 12
    header_size = (data[start] + 1) * 4
    assert data[start + 2 : start + 4] == b"\x21\x01", "an LZMA2 block header"
    data[start + 4] = 40  # the largest dictionary code: 4 GiB - 1
    crc = zlib.crc32(bytes(data[start : start + header_size - 4]))
    data[start + header_size - 4 : start + header_size] = crc.to_bytes(4, "little")
    dest.write_bytes(bytes(data))
    return dest


def tar_gz_with_members(dest: Path, members: int) -> Path:
    """A gzip'd tar of ``members`` empty files: a few MiB on the wire, half a GiB of headers."""
    with gzip.open(dest, "wb", compresslevel=1) as out:
        batch = bytearray()
        for index in range(members):
            header = bytearray(512)
            name = f"m{index}".encode()
            header[: len(name)] = name
            header[100:108] = b"0000644\0"
            header[108:116] = header[116:124] = b"0000000\0"
            header[124:136] = b"00000000000\0"
            header[136:148] = b"00000000000\0"
            header[156] = ord("0")
            header[257:263] = b"ustar\0"
            header[263:265] = b"00"
            header[148:156] = b" " * 8
            header[148:156] = f"{sum(header):06o}\0 ".encode()
            batch += header
            if len(batch) >= 1 << 22:
                out.write(batch)
                batch.clear()
        out.write(batch + bytes(1024))
    return dest


def qcow2_spinner(dest: Path) -> Path:
    """A qcow2 (16 MiB, 90 KiB gzip'd) on which ``qemu-img check`` runs for hours: 1 PiB of
    virtual size, every L1 entry pointing at one L2 table whose every entry points at one data
    cluster, so the check walks the same tables billions of times."""
    qemu_img("create", "-q", "-f", "qcow2", str(dest), "1P")
    data = bytearray(dest.read_bytes())
    cluster = 1 << int.from_bytes(data[20:24], "big")
    l1_size = int.from_bytes(data[36:40], "big")
    l1_offset = int.from_bytes(data[40:48], "big")
    end = -(-len(data) // cluster) * cluster
    data.extend(bytes(end - len(data)))
    l2_offset, data_offset, copied = end, end + cluster, 1 << 63
    data += (data_offset | copied).to_bytes(8, "big") * (cluster // 8) + b"x" * cluster
    data[l1_offset : l1_offset + 8 * l1_size] = (l2_offset | copied).to_bytes(8, "big") * l1_size
    dest.write_bytes(bytes(data))
    return dest
