"""VirtualMachine -> DomainSpec: the spec resolved against the node's layout. Pure."""

from collections.abc import Mapping

from formation_vmm.api.models import Disk, Network, VirtualMachine
from formation_vmm.api.names import ADDRESSES_ANNOTATION, DEFAULT_NETWORK
from formation_vmm.api.quantity import parse_quantity
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name, require_label
from formation_vmm.domain.spec import (
    BaseImage,
    DiskDevice,
    DomainSpec,
    FirmwareFiles,
    InterfaceDevice,
    KernelFiles,
    NodeFirmware,
    Owner,
)
from formation_vmm.ipam import decode_addresses
from formation_vmm.macs import legacy_mac, recorded_macs


class UnsupportedSpecError(ValueError):
    """A spec this agent cannot turn into a domain; the message is shown to the user."""


def needed_images(vm: VirtualMachine) -> list[str]:
    """The VmImages a VM needs before it can get a domain: its disks' and its kernel's."""
    names = [d.image for d in vm.spec.disks if d.image]
    kernel = vm.spec.kernel
    if kernel is not None:
        names += [kernel.image] + ([kernel.initrd] if kernel.initrd else [])
    return list(dict.fromkeys(names))


def _check_base(vm: VirtualMachine, disk: Disk, base: BaseImage) -> None:
    """A disk may be larger than its image (the guest grows into it), never smaller; a .form
    image may ask for a minimum of CPUs and memory."""
    if disk.size is not None and parse_quantity(disk.size) < base.virtual_size:
        raise UnsupportedSpecError(
            f"disk {disk.name!r} is {disk.size}, smaller than image {disk.image!r} "
            f"({base.virtual_size} bytes); leave size out or make it at least that"
        )
    if vm.spec.vcpus < base.min_cpus:
        raise UnsupportedSpecError(f"image {disk.image!r} needs at least {base.min_cpus} CPUs")
    if base.min_memory and vm.spec.memory_bytes < parse_quantity(base.min_memory):
        raise UnsupportedSpecError(f"image {disk.image!r} needs at least {base.min_memory} of memory")


def interface_mac(vm: VirtualMachine, net: Network) -> str:
    """The MAC of one of the VM's interfaces: ``macAddress``, else the one the controller gave
    it (macs.py), else, for a VM bound before the controller recorded MACs, the one derived
    from its uid then: the same for the VM's life."""
    if net.mac_address:
        return net.mac_address.lower()
    return recorded_macs(vm.metadata.annotations).get(net.name) or legacy_mac(vm.metadata.uid or "", net.name)


def assigned_addresses(vm: VirtualMachine) -> dict[str, str]:
    """interface -> the address the controller assigned it: the binding's addresses annotation,
    which only the controller may write (never the status, which only shows it)."""
    given = decode_addresses(vm.metadata.annotations.get(ADDRESSES_ANNOTATION, ""))
    return {iface: ip for iface, (_, ip) in given.items()}


def _networks(vm: VirtualMachine) -> tuple[InterfaceDevice, ...]:
    """Interfaces on VmNetworks (the controller placed the VM only after checking that its
    namespace may use them), each with the MAC it keeps for the VM's life, and libvirt's
    anti-spoofing filter bound to that MAC and the assigned address."""
    addresses = assigned_addresses(vm)
    interfaces = []
    for net in vm.spec.networks:
        require_label(net.name, "network name")
        if net.bridge is not None:
            raise UnsupportedSpecError(
                f"interface {net.name!r} names host bridge {net.bridge!r}; a VM attaches only to "
                "VmNetworks a cluster admin made"
            )
        network = net.network or DEFAULT_NETWORK
        require_label(network, "network")
        interfaces.append(
            InterfaceDevice(
                name=net.name,
                mac=interface_mac(vm, net),
                model=net.model,
                network=network,
                ip=addresses.get(net.name),
            )
        )
    return tuple(interfaces)


def firmware_files(
    vm: VirtualMachine, layout: NodeLayout, owner: Owner, node: NodeFirmware
) -> FirmwareFiles | None:
    """What the VM boots through on this node: the node's BIOS image if it keeps one (else
    QEMU's SeaBIOS: None), or OVMF with the VM's own NVRAM; Secure Boot uses OVMF's secure-boot
    build and a variables template with Microsoft's keys enrolled."""
    firmware = vm.spec.firmware
    if firmware.type == "bios":
        return FirmwareFiles(loader=node.bios, kind="rom") if node.bios is not None else None
    return FirmwareFiles(
        loader=node.efi_secure_code if firmware.secure_boot else node.efi_code,
        kind="pflash",
        secure=firmware.secure_boot,
        nvram=layout.nvram_path(owner),
        nvram_template=node.efi_secure_vars if firmware.secure_boot else node.efi_vars,
    )


def build_domain_spec(
    vm: VirtualMachine,
    layout: NodeLayout,
    domain_type: str,
    images: Mapping[str, BaseImage] | None = None,
    firmware: NodeFirmware | None = None,
    qemu: tuple[int, int] | None = None,
) -> DomainSpec:
    """``images`` maps each name of ``needed_images(vm)`` to its cached base on this node;
    ``firmware``, the node's firmware files (default: Debian's); ``qemu``, the uid and gid its
    QEMU runs as (qemu_uids.py), None for the node's QEMU user."""
    images = images or {}
    missing = [name for name in needed_images(vm) if name not in images]
    if missing:
        raise UnsupportedSpecError(f"images not resolved: {', '.join(missing)}")
    meta = vm.metadata
    if meta.namespace is None or meta.uid is None:
        raise UnsupportedSpecError("a VM needs a namespace and a uid before it gets a domain")
    owner = Owner(namespace=meta.namespace, name=meta.name, uid=meta.uid)
    spec = vm.spec
    disks = []
    for disk in spec.disks:
        require_label(disk.name, "disk name")
        if disk.image is not None:
            _check_base(vm, disk, images[disk.image])
        disks.append(
            DiskDevice(
                name=disk.name,
                path=layout.disk_path(owner, disk.name),
                bus=disk.bus,
                read_only=disk.read_only,
                boot_order=disk.boot_order,
            )
        )
    if spec.cloud_init is not None:
        # A read-only virtio disk, as KubeVirt attaches it: cloud kernels (Debian's among them)
        # have virtio but no AHCI, so a SATA CD-ROM seed is invisible to them and cloud-init
        # falls back to no datasource at all, silently ignoring the VM's configuration.
        disks.append(
            DiskDevice(
                name="cloudinit",
                path=layout.seed_path(owner),
                bus="virtio",
                read_only=True,
                driver_type="raw",
            )
        )
    kernel = None
    if spec.kernel is not None:
        # A .form disk image may carry the command line its kernel wants.
        default_cmdline = next(
            (images[d.image].cmdline for d in spec.disks if d.image and images[d.image].cmdline), None
        )
        kernel = KernelFiles(
            kernel=images[spec.kernel.image].path,
            initrd=images[spec.kernel.initrd].path if spec.kernel.initrd else None,
            cmdline=spec.kernel.cmdline or default_cmdline,
        )
    interfaces = _networks(vm)
    topo = spec.topology
    return DomainSpec(
        name=domain_name(meta.namespace, meta.name),
        owner=owner,
        domain_type=domain_type,
        memory_kib=-(-spec.memory_bytes // 1024),
        sockets=topo.sockets,
        cores=topo.cores,
        threads=topo.threads,
        console_log=layout.console_log(owner),
        disks=tuple(disks),
        interfaces=interfaces,
        kernel=kernel,
        firmware=firmware_files(vm, layout, owner, firmware or NodeFirmware()),
        qemu_uid=qemu[0] if qemu else None,
        qemu_gid=qemu[1] if qemu else None,
    )
