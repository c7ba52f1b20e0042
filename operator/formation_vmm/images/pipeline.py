"""From fetched bytes to a cached base: checksum, decompression, ``.form`` unpacking, format
detection and refusal of backing files with ``qemu-img info``, integrity check, conversion.
Every qemu-img call has a fixed argv and no shell."""

import gzip
import lzma
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from formation_vmm.api.models import ImagePhase
from formation_vmm.domain.spec import BaseImage
from formation_vmm.host import qemu_img
from formation_vmm.host.disk_info import DiskInfo, parse_info
from formation_vmm.host.paths import open_new
from formation_vmm.images.cache import ImageCache
from formation_vmm.images.fetch import CHUNK, Fetched, FetchLimits, sha256_file
from formation_vmm.images.formats import (
    MANIFEST_NAME,
    FormManifest,
    ImageRefusedError,
    check_disk,
    compression_of,
    is_tar,
    parse_manifest,
    safe_member_name,
)

MANIFEST_MAX = 64 << 10


@dataclass(frozen=True)
class Expectation:
    """What the VmImage spec says about the file."""

    format: str  # auto, raw, qcow2, vmdk, form
    checksum: str | None  # sha256:<hex> of the bytes as fetched


Phase = Callable[[ImagePhase], None]  # told "Converting" when conversion starts


def _run(args: list[str], ok_codes: tuple[int, ...] = (0,)) -> str:
    """qemu-img on an image being imported: a refusal means the image is unusable."""
    try:
        return qemu_img.run(*args, ok_codes=ok_codes)
    except qemu_img.QemuImgError as exc:
        raise ImageRefusedError("CorruptImage", str(exc).replace(" failed:", " refused the image:")) from exc


def disk_info(path: Path, fmt: str | None = None) -> DiskInfo:
    args = ["info", "--output=json", "-U"]
    if fmt:
        args += ["-f", fmt]
    return parse_info(_run([*args, str(path)]))


def _copy_limited(src: IO[bytes], dest: Path, max_bytes: int) -> None:
    done = 0
    with os.fdopen(open_new(dest), "wb") as out:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            done += len(chunk)
            if done > max_bytes:
                raise ImageRefusedError(
                    "TooLarge", f"the unpacked image passes the limit of {max_bytes} bytes"
                )
            out.write(chunk)


def decompress(path: Path, cache: ImageCache, limits: FetchLimits) -> Path:
    """The file itself, or a decompressed copy when its bytes say gzip or xz."""
    with path.open("rb") as f:
        kind = compression_of(f.read(8))
    if kind is None:
        return path
    opener = gzip.open if kind == "gzip" else lzma.open
    out = cache.scratch_file("unpacked")
    try:
        with opener(path, "rb") as src:
            _copy_limited(src, out, limits.max_bytes)  # type: ignore[arg-type]
    except (OSError, EOFError, lzma.LZMAError) as exc:
        out.unlink(missing_ok=True)
        raise ImageRefusedError("CorruptImage", f"the {kind} stream is damaged: {exc}") from exc
    return out


def unpack_form(path: Path, cache: ImageCache, limits: FetchLimits) -> tuple[Path, FormManifest]:
    """Read a ``.form`` bundle member by member, never extracting by name: every member must be
    a regular file with a plain relative name; the disk is copied out to a scratch file."""
    manifest: FormManifest | None = None
    disk_out: Path | None = None
    disk_name: str | None = None
    try:
        with tarfile.open(path, mode="r:") as bundle:
            members = bundle.getmembers()
            for member in members:
                safe_member_name(member.name)
                if not member.isfile():
                    raise ImageRefusedError(
                        "UnsafeBundle",
                        f"bundle member {member.name!r} is not a regular file (links are refused)",
                    )
            names = [m.name for m in members]
            if len(set(names)) != len(names):
                raise ImageRefusedError("UnsafeBundle", "the bundle names a member twice")
            by_name = {m.name: m for m in members}
            if MANIFEST_NAME not in by_name or by_name[MANIFEST_NAME].size > MANIFEST_MAX:
                raise ImageRefusedError(
                    "InvalidBundle", f"the bundle has no {MANIFEST_NAME} (or one too large)"
                )
            raw = bundle.extractfile(by_name[MANIFEST_NAME])
            assert raw is not None
            manifest = parse_manifest(raw.read())
            disk_name = manifest.disk
            if disk_name not in by_name or disk_name == MANIFEST_NAME:
                raise ImageRefusedError(
                    "InvalidBundle", f"the manifest names disk {disk_name!r}, not in the bundle"
                )
            src = bundle.extractfile(by_name[disk_name])
            assert src is not None
            disk_out = cache.scratch_file("form-disk")
            _copy_limited(src, disk_out, limits.max_bytes)
    except tarfile.TarError as exc:
        raise ImageRefusedError("InvalidBundle", f"the bundle is not a readable tar archive: {exc}") from exc
    if manifest.checksum is not None and f"sha256:{sha256_file(disk_out)}" != manifest.checksum:
        disk_out.unlink(missing_ok=True)
        raise ImageRefusedError(
            "ChecksumMismatch", f"bundle disk {disk_name} does not match the manifest's checksum"
        )
    return disk_out, manifest


def import_fetched(
    fetched: Fetched, expect: Expectation, cache: ImageCache, limits: FetchLimits, phase: Phase
) -> BaseImage:
    """Turn a fetched file into a cached base (or find the base its bytes already made)."""
    if expect.checksum is not None and f"sha256:{fetched.sha256}" != expect.checksum:
        raise ImageRefusedError(
            "ChecksumMismatch",
            f"the fetched file does not match its checksum: it has sha256:{fetched.sha256}, "
            f"the VmImage says {expect.checksum}",
        )
    known = cache.lookup(fetched.sha256)
    if known is not None:  # the same bytes came before, under another VmImage: share that base
        fetched.path.unlink(missing_ok=True)
        return known
    scratch = [fetched.path]
    try:
        work = decompress(fetched.path, cache, limits)
        scratch.append(work)
        with work.open("rb") as f:
            bundle = is_tar(f.read(512))
        manifest: FormManifest | None = None
        declared = expect.format
        if bundle:
            if declared not in ("auto", "form"):
                raise ImageRefusedError(
                    "FormatMismatch", f"the file is a .form bundle, but the VmImage declares {declared}"
                )
            work, manifest = unpack_form(work, cache, limits)
            scratch.append(work)
            declared = manifest.format
        elif declared == "form":
            raise ImageRefusedError(
                "FormatMismatch", "the VmImage declares a .form bundle, but the file is no tar archive"
            )
        info = disk_info(work)
        check_disk(info, declared)
        if info.format == "qcow2":
            # Exit 3 means leaked clusters only: harmless wasted space. 2 means corruption.
            _run(["check", "-q", "-f", "qcow2", str(work)], ok_codes=(0, 3))
        elif info.format == "vmdk":
            phase("Converting")
            converted = cache.scratch_file("converted")
            _run(["convert", "-q", "-f", "vmdk", "-O", "qcow2", str(work), str(converted)])
            scratch.append(converted)
            work = converted
            info = disk_info(work, "qcow2")
        elif info.format != "raw":
            raise ImageRefusedError(
                "UnsupportedFormat", f"the image is {info.format}; raw, qcow2, vmdk and .form are supported"
            )
        image = BaseImage(
            sha256=fetched.sha256,
            path=work,
            format=info.format,
            size=work.stat().st_size,
            virtual_size=info.virtual_size,
            min_cpus=manifest.min_cpus if manifest else 1,
            min_memory=manifest.min_memory if manifest else None,
            cmdline=manifest.cmdline if manifest else None,
        )
        stored = cache.store(fetched.sha256, work, image)
        scratch.remove(work)
        return stored
    finally:
        for path in scratch:
            path.unlink(missing_ok=True)
