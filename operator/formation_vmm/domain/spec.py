"""What the agent wants a domain to be: the VM spec resolved against the node (paths, type)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass(frozen=True)
class DiskDevice:
    name: str
    path: Path
    bus: str
    read_only: bool = False
    boot_order: int | None = None
    driver_type: Literal["qcow2", "raw"] = "qcow2"
    device: Literal["disk", "cdrom"] = "disk"


@dataclass(frozen=True)
class BaseImage:
    """A verified image in the node's cache, as a VM's overlay disk or kernel uses it."""

    sha256: str  # of the bytes as fetched (the VmImage checksum, when it has one)
    path: Path
    format: str  # raw or qcow2
    size: int  # bytes on disk
    virtual_size: int  # bytes the guest sees
    min_cpus: int = 1  # from a .form manifest
    min_memory: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class InterfaceDevice:
    name: str
    mac: str
    model: str
    network: str  # the VmNetwork's name
    ip: str | None = None  # the address the controller assigned, if the network has IPAM


@dataclass(frozen=True)
class KernelFiles:
    kernel: Path
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class NodeFirmware:
    """The firmware files of a node (settings kernel_path, efi_*): Debian's ovmf package by default."""

    bios: Path | None = None  # VMM_KERNEL_PATH: a BIOS image of the node's own; None: QEMU's SeaBIOS
    efi_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    efi_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    efi_secure_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
    efi_secure_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")  # Microsoft's keys enrolled


@dataclass(frozen=True)
class FirmwareFiles:
    """The firmware a domain boots through (None in DomainSpec: QEMU's own SeaBIOS)."""

    loader: Path
    kind: Literal["rom", "pflash"]  # a BIOS image, or UEFI code in flash
    secure: bool = False  # Secure Boot: needs SMM and the q35 machine
    nvram: Path | None = None  # the VM's own UEFI variables, made from the template at first start
    nvram_template: Path | None = None

    def files(self) -> list[Path]:
        """The node's files this firmware needs (the NVRAM itself is the VM's)."""
        return [self.loader, *([self.nvram_template] if self.nvram_template else [])]


@dataclass(frozen=True)
class Owner:
    """The VM a domain belongs to, recorded in the domain's <metadata>."""

    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class DomainSpec:
    """Everything needed to write one domain's XML; built from a VM by ``domain.build``."""

    name: str
    owner: Owner
    domain_type: str
    memory_kib: int
    sockets: int
    cores: int
    threads: int
    console_log: Path
    disks: tuple[DiskDevice, ...] = ()
    interfaces: tuple[InterfaceDevice, ...] = ()
    kernel: KernelFiles | None = None
    firmware: FirmwareFiles | None = None
    uuid: str | None = None
    # The uid and gid its QEMU runs as (qemu_uids.py); None: the node's QEMU user (a VM bound
    # before the controller recorded one).
    qemu_uid: int | None = None
    qemu_gid: int | None = None

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads
