"""VirtualMachine -> DomainSpec: the spec resolved against the node's layout. Pure."""

from collections.abc import Mapping
from pathlib import Path

from formation_vmm.api.models import VirtualMachine
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name, require_label, stable_mac
from formation_vmm.domain.spec import DiskDevice, DomainSpec, InterfaceDevice, KernelFiles, Owner


class UnsupportedSpecError(ValueError):
    """A spec this agent cannot turn into a domain; the message is shown to the user."""


def image_names(vm: VirtualMachine) -> list[str]:
    """The VmImages a VM needs before it can get a domain (kernel and initrd for now)."""
    kernel = vm.spec.kernel
    if kernel is None:
        return []
    return [kernel.image] + ([kernel.initrd] if kernel.initrd else [])


def build_domain_spec(
    vm: VirtualMachine, layout: NodeLayout, domain_type: str, images: Mapping[str, Path] | None = None
) -> DomainSpec:
    """``images`` maps each name of ``image_names(vm)`` to the file that holds it on this node."""
    images = images or {}
    meta = vm.metadata
    if meta.namespace is None or meta.uid is None:
        raise UnsupportedSpecError("a VM needs a namespace and a uid before it gets a domain")
    spec = vm.spec
    disks = []
    for disk in spec.disks:
        require_label(disk.name, "disk name")
        if disk.image is not None:
            raise UnsupportedSpecError(
                f"disk {disk.name!r} uses image {disk.image!r}, and this agent does not import images yet"
            )
        disks.append(
            DiskDevice(
                name=disk.name,
                path=layout.disk_path(meta.namespace, meta.name, disk.name),
                bus=disk.bus,
                read_only=disk.read_only,
                boot_order=disk.boot_order,
            )
        )
    if spec.cloud_init is not None:
        disks.append(
            DiskDevice(
                name="cloudinit",
                path=layout.seed_path(meta.namespace, meta.name),
                bus="sata",
                read_only=True,
                driver_type="raw",
                device="cdrom",
            )
        )
    kernel = None
    if spec.kernel is not None:
        missing = [name for name in image_names(vm) if name not in images]
        if missing:
            raise UnsupportedSpecError(f"images not resolved: {', '.join(missing)}")
        kernel = KernelFiles(
            kernel=images[spec.kernel.image],
            initrd=images[spec.kernel.initrd] if spec.kernel.initrd else None,
            cmdline=spec.kernel.cmdline,
        )
    interfaces = tuple(
        InterfaceDevice(
            name=require_label(net.name, "network name"),
            mac=(net.mac_address or stable_mac(meta.uid, net.name)).lower(),
            model=net.model,
            network=None if net.bridge else (net.network or "default"),
            bridge=net.bridge,
        )
        for net in spec.networks
    )
    topo = spec.topology
    return DomainSpec(
        name=domain_name(meta.namespace, meta.name),
        owner=Owner(namespace=meta.namespace, name=meta.name, uid=meta.uid),
        domain_type=domain_type,
        memory_kib=-(-spec.memory_bytes // 1024),
        sockets=topo.sockets,
        cores=topo.cores,
        threads=topo.threads,
        console_log=layout.console_log(meta.namespace, meta.name),
        disks=tuple(disks),
        interfaces=interfaces,
        kernel=kernel,
    )
