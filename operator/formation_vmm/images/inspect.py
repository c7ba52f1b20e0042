"""The one inspector that decides whether an image may be used, from what ``qemu-img info`` says
of it (its format-specific block included). Pure.

An image is data from a tenant, and its metadata can name other files: a qcow2 backing file or
external data file, VMDK extents, JSON or protocol file names (OpenStack's OSSA-2024-001,
CVE-2024-32498, read host files through exactly these). Only self-contained images pass: raw as
raw, qcow2 with neither backing file nor data file, VMDK as one sparse extent that is the file
itself (``monolithicSparse`` or ``streamOptimized``). The table of refused shapes is the test.
"""

from formation_vmm.host.disk_info import DiskInfo
from formation_vmm.images.formats import ImageRefusedError

SUPPORTED = ("raw", "qcow2", "vmdk")
SELF_CONTAINED_VMDK = ("monolithicSparse", "streamOptimized")
# VMDK's "no parent" content id.
NO_PARENT_CID = 0xFFFFFFFF


def _names_elsewhere(name: str) -> bool:
    return name.startswith("json:") or "://" in name


def inspect(info: DiskInfo, path: str, declared: str) -> None:
    """Raise ImageRefusedError unless the file at ``path`` (as handed to qemu-img) is a
    self-contained image of a supported format matching ``declared`` (auto, form, raw, qcow2,
    vmdk)."""
    if info.backing is not None:
        raise ImageRefusedError(
            "BackingFileRefused",
            f"the image names a backing file ({info.backing!r}); only self-contained images are accepted",
        )
    if info.format not in SUPPORTED:
        raise ImageRefusedError(
            "UnsupportedFormat", f"the image is {info.format}; raw, qcow2, vmdk and .form are supported"
        )
    wanted = {"auto": None, "form": None}.get(declared, declared)
    if wanted is not None and info.format != wanted:
        raise ImageRefusedError(
            "FormatMismatch", f"the image is {info.format}, but the VmImage declares format {declared}"
        )
    if info.format == "qcow2":
        data_file = info.specific.get("data-file")
        if data_file:
            raise ImageRefusedError(
                "ExternalDataRefused",
                f"the qcow2 image keeps its data in another file ({data_file!r}); only self-contained "
                "images are accepted",
            )
    if info.format == "vmdk":
        _inspect_vmdk(info, path)


def _inspect_vmdk(info: DiskInfo, path: str) -> None:
    create_type = info.specific.get("create-type")
    if create_type not in SELF_CONTAINED_VMDK:
        raise ImageRefusedError(
            "ExternalExtentRefused",
            f"the VMDK image is {create_type!r}; only self-contained ones are accepted "
            f"({', '.join(SELF_CONTAINED_VMDK)})",
        )
    parent = info.specific.get("parent-cid")
    if parent is not None and int(parent) != NO_PARENT_CID:
        raise ImageRefusedError(
            "BackingFileRefused",
            "the VMDK image is a delta of a parent disk; only self-contained images are accepted",
        )
    extents = info.specific.get("extents") or []
    names = [str(e.get("filename", "")) for e in extents if isinstance(e, dict)]
    if len(extents) != 1 or len(names) != 1:
        raise ImageRefusedError(
            "ExternalExtentRefused", f"the VMDK image has {len(extents)} extents; exactly one is accepted"
        )
    if names[0] != path or _names_elsewhere(names[0]):
        raise ImageRefusedError(
            "ExternalExtentRefused",
            f"the VMDK image's extent is another file ({names[0]!r}); "
            "only self-contained images are accepted",
        )
