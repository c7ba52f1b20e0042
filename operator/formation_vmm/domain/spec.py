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
    network: str


@dataclass(frozen=True)
class KernelFiles:
    kernel: Path
    initrd: Path | None = None
    cmdline: str | None = None


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
    uuid: str | None = None

    @property
    def vcpus(self) -> int:
        return self.sockets * self.cores * self.threads
