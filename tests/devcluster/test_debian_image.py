"""The Debian image builder's BIOS boot setup: GRUB's boot sector merged into the disk's
protective MBR, and GRUB's core image told where it lies, as grub-bios-setup does (the guest
tier boots the result through SeaBIOS)."""

import struct

import pytest

from formation_vmm.devcluster.debian_image import GRUB_DIR, bios_boot_sectors

pytestmark = pytest.mark.host  # reads GRUB's boot.img from grub-pc-bin


def protective_mbr() -> bytes:
    sector = bytearray(512)
    sector[0x1B8:0x1BC] = b"\x12\x34\x56\x78"  # disk signature
    sector[0x1BE:0x1CE] = bytes([0, 0, 2, 0, 0xEE, 0xFF, 0xFF, 0xFF, 1, 0, 0, 0, 0xFF, 0xFF, 0x1F, 0])
    sector[0x1FE:] = b"\x55\xaa"
    return bytes(sector)


def test_the_boot_sector_keeps_the_partition_table_and_points_at_the_core_image() -> None:
    boot_img = (GRUB_DIR / "i386-pc/boot.img").read_bytes()
    mbr0 = protective_mbr()
    core = bytearray(1500)  # three sectors; diskboot's blocklist ends the first
    struct.pack_into("<QHH", core, 500, 2, 0, 0x820)
    mbr, patched = bios_boot_sectors(mbr0, boot_img, bytes(core), 2048)

    assert mbr[0x1B8:] == mbr0[0x1B8:]  # signature, partitions and 0x55AA: the disk's own
    assert mbr[:3] == boot_img[:3]  # GRUB's jump
    assert mbr[0x5A:0x5C] == boot_img[0x5A:0x5C]
    assert struct.unpack_from("<Q", mbr, 0x5C) == (2048,)
    assert mbr[0x66:0x68] == b"\x90\x90"
    assert len(patched) == 1536
    assert struct.unpack_from("<QHH", patched, 500) == (2049, 2, 0x820)
    assert patched[512:1500] == bytes(core[512:])


def test_wrong_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="512 bytes"):
        bios_boot_sectors(b"\0" * 511, b"\0" * 512, b"\0" * 512, 2048)
