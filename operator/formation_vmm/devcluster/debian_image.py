"""A small bootable Debian 12 disk image, built here from Debian's packages: the cloud kernel,
systemd, cloud-init (NoCloud only), qemu-guest-agent, busybox's httpd as a probe target, and GRUB
for both BIOS and UEFI on one GPT disk. What users boot first (a distribution's cloud image,
through firmware), small enough for TCG.

Built without loop devices or mounts: mmdebstrap fills a directory, `mke2fs -d` turns it into
the root filesystem, mtools writes the EFI system partition, and GRUB's BIOS boot code is put
in place here (`bios_boot_sectors`), as grub-bios-setup would; the partitions are copied into
one raw disk at their offsets and converted to a compressed qcow2. Needs root (the files keep
their owners) and the host packages hack/install-system-deps.sh lists.

The result is cached by the recipe's content (this file), under
$VMM_CACHE_DIR/guest-images/, like the control-plane binaries: a second build is a lookup.
`hack/build-debian-image` prints its path."""

import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "linux-image-cloud-amd64",
    "systemd-sysv",
    "udev",
    "dbus",  # systemd-logind needs it, and logind turns ACPI's power button into a clean poweroff
    "cloud-init",
    "cloud-guest-utils",  # growpart, for cloud-init's growpart module
    "e2fsprogs",
    "qemu-guest-agent",
    "ifupdown",  # cloud-init's network renderer on Debian
    "isc-dhcp-client",
    "busybox",  # httpd: the probe target
)
# Left out of every package: nothing in the guest reads them, and each MiB is read by TCG.
PATH_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/i18n/*",
    "/usr/share/lintian/*",
)
ROOT_LABEL = "vmmroot"
DISK_MIB = 1024
# GPT: BIOS boot partition (GRUB's core image), EFI system partition, root (last, so that
# growpart can grow it to the end of a bigger disk).
BIOS_BOOT = (1, 2)
ESP = (2, 18)
ROOT_START = 18
CMDLINE = f"root=LABEL={ROOT_LABEL} ro console=ttyS0 net.ifnames=0"
# The probe target: busybox httpd on port 8080 serving /srv/probe (GET /healthz answers "ok").
PROBE_PORT = 8080
# Printed on the serial console once systemd reached multi-user.target.
BOOTED_MARKER = "formation-vmm debian: booted"

OVERLAY: dict[str, str] = {
    "etc/fstab": f"LABEL={ROOT_LABEL} / ext4 defaults,discard 0 1\n",
    "etc/hostname": "debian\n",
    # The guest contacts nothing: NoCloud is the only datasource (no metadata-address probing),
    # nothing is installed or upgraded, no NTP.
    "etc/cloud/cloud.cfg.d/90-formation-vmm.cfg": (
        "datasource_list: [NoCloud, None]\n"
        "package_update: false\n"
        "package_upgrade: false\n"
        "apt:\n  preserve_sources_list: true\n"
        "ntp:\n  enabled: false\n"
        # The image has no locales but C.UTF-8 (glibc's own): generating en_US fails.
        "locale: C.UTF-8\n"
    ),
    # Only what a virtio guest needs in the initramfs: a fifth of the default's size.
    "etc/initramfs-tools/conf.d/formation-vmm": "MODULES=list\nCOMPRESS=zstd\n",
    "etc/initramfs-tools/modules": "virtio_pci\nvirtio_blk\nvirtio_scsi\nvirtio_net\next4\n",
    "etc/systemd/system/formation-probe.service": (
        "[Unit]\nDescription=HTTP probe target\n\n[Service]\n"
        f"ExecStart=/bin/busybox httpd -f -p {PROBE_PORT} -h /srv/probe\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
    "etc/systemd/system/formation-booted.service": (
        "[Unit]\nDescription=Say the guest booted\nAfter=multi-user.target\n\n[Service]\n"
        f"Type=oneshot\nExecStart=/bin/sh -c 'echo \"{BOOTED_MARKER}\" > /dev/ttyS0'\n\n"
        "[Install]\nWantedBy=multi-user.target\n"
    ),
    "srv/probe/healthz": "ok\n",
    "boot/grub/grub.cfg": (
        "serial --unit=0 --speed=115200\nterminal_input serial console\n"
        "terminal_output serial console\nset timeout=0\n"
        f"menuentry 'Debian GNU/Linux' {{\n  linux /vmlinuz {CMDLINE}\n  initrd /initrd.img\n}}\n"
    ),
}
# Units that would wait, wake up or reach out on a guest that has nothing for them to do.
MASKED = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "ifupdown-wait-online.service",
    "systemd-networkd-wait-online.service",
)
ENABLED = ("formation-probe.service", "formation-booted.service")
# GRUB's own configuration, built into its images: find the root filesystem by label and read
# its grub.cfg, the same file for both firmwares.
GRUB_EMBEDDED = f"search --no-floppy --label --set=root {ROOT_LABEL}\nset prefix=($root)/boot/grub\n"
GRUB_MODULES = (
    "part_gpt",
    "ext2",
    "search",
    "search_label",
    "normal",
    "configfile",
    "linux",
    "echo",
    "serial",
    "terminal",
    "test",
)
GRUB_DIR = Path("/usr/lib/grub")

MIB = 1024 * 1024
SECTOR = 512
# Offsets in GRUB's i386-pc boot.img and diskboot.img (grub/include/grub/i386/pc/boot.h).
BPB = slice(0x03, 0x5A)  # a FAT BIOS parameter block, kept from the disk's own sector 0
KERNEL_SECTOR = 0x5C  # u64: where the core image starts
DRIVE_CHECK = 0x66  # two bytes; NOPs make boot.img trust the drive number the BIOS gave
PARTITION_TABLE = slice(0x1B8, 0x200)  # disk signature, partition table and 0x55AA: the disk's
BLOCKLIST = SECTOR - 12  # diskboot.img's first blocklist: u64 start, u16 sectors, u16 segment


def bios_boot_sectors(sector0: bytes, boot_img: bytes, core_img: bytes, core_lba: int) -> tuple[bytes, bytes]:
    """GRUB's boot sector merged with the disk's sector 0 (its protective MBR), and the core
    image told where its own remaining sectors are: the two writes grub-bios-setup makes when
    the core image is embedded at `core_lba`."""
    if len(sector0) != SECTOR or len(boot_img) != SECTOR:
        raise ValueError("boot sectors are 512 bytes")
    mbr = bytearray(boot_img)
    mbr[BPB] = sector0[BPB]
    mbr[PARTITION_TABLE] = sector0[PARTITION_TABLE]
    mbr[KERNEL_SECTOR : KERNEL_SECTOR + 8] = struct.pack("<Q", core_lba)
    mbr[DRIVE_CHECK : DRIVE_CHECK + 2] = b"\x90\x90"
    sectors = -(-len(core_img) // SECTOR)
    core = bytearray(core_img.ljust(sectors * SECTOR, b"\0"))
    _, _, segment = struct.unpack_from("<QHH", core, BLOCKLIST)
    struct.pack_into("<QHH", core, BLOCKLIST, core_lba + 1, sectors - 1, segment)
    return bytes(mbr), bytes(core)


def cache_dir() -> Path:
    base = os.environ.get("VMM_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "formation-vmm"
    )
    return Path(base) / "guest-images"


def recipe_digest() -> str:
    """The cache key: this file is the whole recipe."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def image_path() -> Path:
    return cache_dir() / f"debian-12-{recipe_digest()}.qcow2"


def _run(*argv: str, **kwargs: object) -> None:
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]  # noqa: S603


def _rootfs(work: Path) -> Path:
    overlay = work / "overlay"
    for relative, text in OVERLAY.items():
        path = overlay / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    root = work / "root"
    hooks = [
        # Before the packages, so the kernel's initramfs is made once, with our settings.
        f"--essential-hook=sync-in {overlay} /",
        '--customize-hook=chroot "$1" systemctl mask ' + " ".join(MASKED),
        '--customize-hook=chroot "$1" systemctl enable ' + " ".join(ENABLED),
        '--customize-hook=chroot "$1" passwd --lock root',
        # A machine id made at first boot, so that two VMs from the image differ.
        '--customize-hook=rm -f "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"',
        '--customize-hook=touch "$1/etc/machine-id"',
    ]
    _run(
        "mmdebstrap",
        "--variant=apt",
        "--mode=root",
        "--aptopt=APT::Install-Recommends false",
        f"--include={','.join(PACKAGES)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in PATH_EXCLUDES),
        *hooks,
        SUITE,
        str(root),
        MIRROR,
    )
    return root


def _grub_image(work: Path, target: str, out: Path) -> None:
    embedded = work / "grub-embedded.cfg"
    embedded.write_text(GRUB_EMBEDDED)
    extra = ("biosdisk",) if target == "i386-pc" else ()  # BIOS reads disks through the firmware
    _run(
        "grub-mkimage",
        "--format",
        target,
        "--directory",
        str(GRUB_DIR / target),
        "--prefix",
        "/boot/grub",
        "--config",
        str(embedded),
        "--output",
        str(out),
        *GRUB_MODULES,
        *extra,
    )


def _disk(work: Path, root: Path) -> Path:
    raw = work / "disk.raw"
    with raw.open("wb") as f:
        f.truncate(DISK_MIB * MIB)
    table = (
        "label: gpt\n"
        f"start={BIOS_BOOT[0] * 2048}, size={(BIOS_BOOT[1] - BIOS_BOOT[0]) * 2048}, "
        "type=21686148-6449-6E6F-744E-656564454649, name=bios\n"
        f"start={ESP[0] * 2048}, size={(ESP[1] - ESP[0]) * 2048}, "
        "type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n"
        f"start={ROOT_START * 2048}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n"
    )
    _run("sfdisk", "--quiet", str(raw), input=table.encode())

    rootfs = work / "root.ext4"
    _run(
        "mke2fs", "-q", "-t", "ext4", "-L", ROOT_LABEL, "-d", str(root), str(rootfs),
        f"{DISK_MIB - ROOT_START - 1}M",
    )  # fmt: skip
    esp = work / "esp.fat"
    efi = work / "BOOTX64.EFI"
    _grub_image(work, "x86_64-efi", efi)
    _run("mkfs.vfat", "-n", "ESP", "-C", str(esp), str((ESP[1] - ESP[0]) * 1024), stdout=subprocess.DEVNULL)
    _run("mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT")
    _run("mcopy", "-i", str(esp), str(efi), "::/EFI/BOOT/BOOTX64.EFI")

    core = work / "core.img"
    _grub_image(work, "i386-pc", core)
    core_lba = BIOS_BOOT[0] * MIB // SECTOR
    with raw.open("r+b") as disk:
        sector0 = disk.read(SECTOR)
        mbr, core_bytes = bios_boot_sectors(
            sector0, (GRUB_DIR / "i386-pc/boot.img").read_bytes(), core.read_bytes(), core_lba
        )
        if len(core_bytes) > (BIOS_BOOT[1] - BIOS_BOOT[0]) * MIB:
            raise RuntimeError("GRUB's core image does not fit its partition")
        disk.seek(0)
        disk.write(mbr)
        disk.seek(core_lba * SECTOR)
        disk.write(core_bytes)
        for start, part in ((ESP[0], esp), (ROOT_START, rootfs)):
            disk.seek(start * MIB)
            with part.open("rb") as src:
                shutil.copyfileobj(src, disk, 4 * MIB)
    return raw


def build(dest: Path | None = None) -> Path:
    """The image's path, built first if the cache lacks it. Built in a scratch directory next
    to the cache and renamed into place, so an interrupted build leaves no image behind."""
    dest = dest or image_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debian-image-", dir=dest.parent) as scratch:
        work = Path(scratch)
        raw = _disk(work, _rootfs(work))
        partial = work / "image.qcow2"
        _run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", str(raw), str(partial))
        partial.rename(dest)
    return dest


def main() -> None:
    started = time.monotonic()
    cached = image_path().is_file()
    path = build()
    took = time.monotonic() - started
    size = path.stat().st_size / MIB
    how = "cached" if cached else f"built in {took:.0f} s"
    print(f"debian-image: {path} ({size:.0f} MiB, {how})", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
