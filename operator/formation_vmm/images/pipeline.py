"""From fetched bytes to a cached base: checksum, bounded decompression, ``.form`` unpacking,
format detection and inspection (``inspect.py``), integrity check, conversion. Every qemu-img
call on the tenant's bytes runs in the sandbox (``host/sandbox.py``), with an explicit ``-f``
once the format is known."""

import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from formation_vmm.api.models import ImagePhase
from formation_vmm.domain.spec import BaseImage
from formation_vmm.host import sandbox
from formation_vmm.host.disk_info import DiskInfo, parse_info
from formation_vmm.host.paths import open_new
from formation_vmm.host.qemu_img import QemuImgError
from formation_vmm.images.cache import ImageCache
from formation_vmm.images.fetch import CHUNK, Fetched, FetchLimits, sha256_file
from formation_vmm.images.formats import (
    MANIFEST_NAME,
    FormManifest,
    ImageRefusedError,
    compression_of,
    is_tar,
    is_vmdk_descriptor,
    parse_manifest,
    safe_member_name,
)
from formation_vmm.images.inspect import inspect

MANIFEST_MAX = 64 << 10
# A .form bundle holds a manifest and a disk; a few other files are tolerated, no more: a tar
# of a million members is refused after the first few, never listed whole.
MAX_MEMBERS = 16
# xz streams declare the dictionary they need; one that asks for more memory than this is
# refused before it is decompressed (xz -9 needs 65 MiB).
XZ_MEMLIMIT = 256 << 20


@dataclass(frozen=True)
class Expectation:
    """What the VmImage spec says about the file."""

    format: str  # auto, raw, qcow2, vmdk, form
    checksum: str | None  # sha256:<hex> of the bytes as fetched


Phase = Callable[[ImagePhase], None]  # told "Converting" when conversion starts


def _qemu_img(args: list[str], reads: list[Path], limits: sandbox.Limits, scratch: Path | None = None) -> str:
    """qemu-img in the sandbox on an image being imported: a refusal means the image is
    unusable (its message says why: corrupt, or over a limit)."""
    try:
        return sandbox.run(args, reads, scratch, limits, ok_codes=(0, 3) if args[0] == "check" else (0,))
    except QemuImgError as exc:
        message = str(exc).replace(" failed:", " refused the image:")
        if "Permission denied" in message:  # the file it was handed is always readable
            raise ImageRefusedError(
                "ExternalFileRefused",
                f"the image refers to a file outside itself, which is refused ({message})",
            ) from exc
        raise ImageRefusedError("CorruptImage", message) from exc


def _limits(limits: FetchLimits, **more: int) -> sandbox.Limits:
    return sandbox.Limits(memory=limits.qemu_img_memory, cpu_seconds=limits.qemu_img_cpu_seconds, **more)


def disk_info(path: Path, limits: FetchLimits, fmt: str | None = None) -> DiskInfo:
    """``qemu-img info`` in the sandbox; without ``fmt`` it detects the format from the bytes."""
    args = ["info", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return parse_info(_qemu_img([*args, str(path)], [path], _limits(limits)))


def _write_limited(dest: Path, max_bytes: int, produce: Callable[[], bytes]) -> None:
    done = 0
    with os.fdopen(open_new(dest), "wb") as out:
        while chunk := produce():
            done += len(chunk)
            if done > max_bytes:
                raise ImageRefusedError(
                    "TooLarge", f"the unpacked image passes the limit of {max_bytes} bytes"
                )
            out.write(chunk)


class _Unpacker:
    """gzip or xz, stream by stream (a file may hold several), never more than CHUNK of output
    at a time, so neither a bomb nor a long file grows memory."""

    def __init__(self, kind: str, src: IO[bytes]) -> None:
        self.kind = kind
        self.src = src
        self.pending = b""
        self.decoder = self._new()

    def _new(self) -> "zlib._Decompress | lzma.LZMADecompressor":
        if self.kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=XZ_MEMLIMIT)

    def __call__(self) -> bytes:
        while True:
            decoder = self.decoder
            if isinstance(decoder, lzma.LZMADecompressor):
                if decoder.eof:
                    if not self._next_stream(decoder.unused_data):
                        return b""
                    continue
                data = self.pending or (self.src.read(CHUNK) if decoder.needs_input else b"")
                self.pending = b""
                if not data and decoder.needs_input:
                    raise ImageRefusedError("CorruptImage", "the xz stream ends early")
                out = decoder.decompress(data, CHUNK)
            else:
                if decoder.eof:
                    if not self._next_stream(decoder.unused_data):
                        return b""
                    continue
                data = self.pending or decoder.unconsumed_tail or self.src.read(CHUNK)
                self.pending = b""
                if not data:
                    raise ImageRefusedError("CorruptImage", "the gzip stream ends early")
                out = decoder.decompress(data, CHUNK)
            if out:
                return out

    def _next_stream(self, unused: bytes) -> bool:
        rest = (unused + self.src.read(CHUNK)).lstrip(b"\0")  # xz pads streams with zeros
        if not rest:
            return False
        self.pending = rest
        self.decoder = self._new()
        return True


def decompress(path: Path, cache: ImageCache, limits: FetchLimits) -> Path:
    """The file itself, or a decompressed copy when its bytes say gzip or xz."""
    with path.open("rb") as f:
        kind = compression_of(f.read(8))
    if kind is None:
        return path
    out = cache.scratch_file("unpacked")
    try:
        with path.open("rb") as src:
            _write_limited(out, limits.max_bytes, _Unpacker(kind, src))
    except lzma.LZMAError as exc:
        out.unlink(missing_ok=True)
        if "Memory usage limit" in str(exc):
            raise ImageRefusedError(
                "DecompressionBomb",
                f"the xz stream needs more than {XZ_MEMLIMIT >> 20} MiB of memory to unpack; refused",
            ) from exc
        raise ImageRefusedError("CorruptImage", f"the xz stream is damaged: {exc}") from exc
    except (OSError, EOFError, zlib.error) as exc:
        out.unlink(missing_ok=True)
        raise ImageRefusedError("CorruptImage", f"the {kind} stream is damaged: {exc}") from exc
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return out


def _members(bundle: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """The bundle's members, read one header at a time: each a regular file with a plain
    relative name, named once, and no more than MAX_MEMBERS of them."""
    found: dict[str, tarfile.TarInfo] = {}
    for count, member in enumerate(bundle, start=1):
        if count > MAX_MEMBERS:
            raise ImageRefusedError("UnsafeBundle", f"the bundle has more than {MAX_MEMBERS} members")
        safe_member_name(member.name)
        if not member.isfile():
            raise ImageRefusedError(
                "UnsafeBundle", f"bundle member {member.name!r} is not a regular file (links are refused)"
            )
        if member.name in found:
            raise ImageRefusedError("UnsafeBundle", "the bundle names a member twice")
        found[member.name] = member
    return found


def unpack_form(path: Path, cache: ImageCache, limits: FetchLimits) -> tuple[Path, FormManifest]:
    """Read a ``.form`` bundle member by member, never extracting by name; the disk is copied
    out to a scratch file."""
    disk_out = cache.scratch_file("form-disk")
    try:
        with tarfile.open(path, mode="r:") as bundle:
            by_name = _members(bundle)
            manifest_member = by_name.get(MANIFEST_NAME)
            if manifest_member is None or manifest_member.size > MANIFEST_MAX:
                raise ImageRefusedError(
                    "InvalidBundle", f"the bundle has no {MANIFEST_NAME} (or one too large)"
                )
            raw = bundle.extractfile(manifest_member)
            assert raw is not None
            manifest = parse_manifest(raw.read(MANIFEST_MAX))
            disk = by_name.get(manifest.disk)
            if disk is None or manifest.disk == MANIFEST_NAME:
                raise ImageRefusedError(
                    "InvalidBundle", f"the manifest names disk {manifest.disk!r}, not in the bundle"
                )
            src = bundle.extractfile(disk)
            assert src is not None
            _write_limited(disk_out, limits.max_bytes, lambda: src.read(CHUNK))
    except tarfile.TarError as exc:
        disk_out.unlink(missing_ok=True)
        raise ImageRefusedError("InvalidBundle", f"the bundle is not a readable tar archive: {exc}") from exc
    except BaseException:
        disk_out.unlink(missing_ok=True)
        raise
    if manifest.checksum is not None and f"sha256:{sha256_file(disk_out)}" != manifest.checksum:
        disk_out.unlink(missing_ok=True)
        raise ImageRefusedError(
            "ChecksumMismatch", f"bundle disk {manifest.disk} does not match the manifest's checksum"
        )
    return disk_out, manifest


def _refuse_descriptor(path: Path) -> None:
    with path.open("rb") as f:
        if is_vmdk_descriptor(f.read(512)):
            raise ImageRefusedError(
                "ExternalExtentRefused",
                "the image is a VMDK descriptor, which names other files for its data; only "
                "self-contained VMDK images (monolithicSparse, streamOptimized) are accepted",
            )


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
        _refuse_descriptor(work)
        info = disk_info(work, limits)  # detection, from the bytes
        inspect(info, str(work), declared)
        info = disk_info(work, limits, info.format)  # from here on the format is stated, never probed
        inspect(info, str(work), declared)
        if info.format == "qcow2":
            # Exit 3 means leaked clusters only: harmless wasted space. 2 means corruption.
            _qemu_img(["check", "-q", "-f", "qcow2", str(work)], [work], _limits(limits))
        elif info.format == "vmdk":
            phase("Converting")
            converted = cache.scratch_file("converted")
            scratch.append(converted)
            _qemu_img(
                ["convert", "-q", "-f", "vmdk", "-O", "qcow2", str(work), str(converted)],
                [work],
                sandbox.Limits(
                    memory=limits.qemu_img_memory,
                    # Time to convert: the info budget plus a second per 16 MiB of disk.
                    cpu_seconds=limits.qemu_img_cpu_seconds + info.virtual_size // (16 << 20),
                    file_size=limits.max_bytes,
                    wall_seconds=3600,
                ),
                scratch=cache.scratch,
            )
            work = converted
            info = disk_info(work, limits, "qcow2")
            inspect(info, str(work), "qcow2")
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
