"""DomainSpec <-> libvirt domain XML. Elements are written in one fixed order so golden files hold."""

import functools
import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace

from formation_vmm.api.names import LIBVIRT_METADATA_NS, LIBVIRT_METADATA_PREFIX, libvirt_network
from formation_vmm.domain.guard_xml import GUEST_FILTER
from formation_vmm.domain.spec import DiskDevice, DomainSpec, InterfaceDevice, Owner

ET.register_namespace(LIBVIRT_METADATA_PREFIX, LIBVIRT_METADATA_NS)

_BUS_DEVICE_PREFIX = {"virtio": "vd", "sata": "sd", "scsi": "sd"}


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    child = ET.SubElement(parent, tag, attrs)
    if text is not None:
        child.text = text
    return child


def _device_name(bus: str, index: int) -> str:
    return _BUS_DEVICE_PREFIX[bus] + chr(ord("a") + index)


def spec_hash(spec: DomainSpec) -> str:
    """A digest of everything the domain is made of; recorded in the domain's metadata so the
    agent can tell a domain defined from an older spec (which needs a restart to change)."""
    # Without the UUID: a redefinition keeps the domain's UUID, which is not part of the spec.
    return _digest(replace(spec, uuid=None))


# Every sync of a VM builds its spec again and compares digests: rendering the XML for that was
# a sixth of an agent's CPU in a burst. Equal specs have equal digests, so remember the last few
# hundred (a spec is a few hundred bytes; an agent holds a few hundred VMs).
@functools.lru_cache(maxsize=512)
def _digest(spec: DomainSpec) -> str:
    return hashlib.sha256(_render(spec, None).encode()).hexdigest()[:16]


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML for ``spec``, its spec hash recorded in the metadata."""
    return _render(spec, spec_hash(spec))


def _render(spec: DomainSpec, digest: str | None) -> str:
    dom = ET.Element("domain", type=spec.domain_type)
    _sub(dom, "name", spec.name)
    if spec.uuid:
        _sub(dom, "uuid", spec.uuid)
    metadata = _sub(dom, "metadata")
    _owner(metadata, spec.owner, digest)
    _sub(dom, "memory", str(spec.memory_kib), unit="KiB")
    _sub(dom, "vcpu", str(spec.vcpus), placement="static")
    _os(_sub(dom, "os"), spec)
    features = _sub(dom, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if spec.firmware is not None and spec.firmware.secure:
        _sub(features, "smm", state="on")
    cpu = _sub(dom, "cpu")
    _sub(
        cpu, "topology", sockets=str(spec.sockets), dies="1", cores=str(spec.cores), threads=str(spec.threads)
    )
    _sub(dom, "clock", offset="utc")
    _sub(dom, "on_poweroff", "destroy")
    _sub(dom, "on_reboot", "restart")
    # A crash must leave the domain shut off so the agent sees it and applies the runStrategy.
    _sub(dom, "on_crash", "destroy")
    devices = _sub(dom, "devices")
    _disks(devices, spec.disks)
    _interfaces(devices, spec.interfaces)
    _console(devices, spec)
    _guest_agent(devices)
    if spec.qemu_uid is not None:
        # QEMU as the VM's own uid and gid, and libvirt relabels nothing: the agent hands the
        # VM's own files to that uid (agent/vms/files.py), and the shared bases and kernels stay
        # root's, read-only to all (a relabel would chown them to whichever VM started last).
        label = _sub(dom, "seclabel", type="static", model="dac", relabel="no")
        _sub(label, "label", f"+{spec.qemu_uid}:+{spec.qemu_gid or spec.qemu_uid}")
    ET.indent(dom, "  ")
    return ET.tostring(dom, encoding="unicode") + "\n"


def _owner(metadata: ET.Element, owner: Owner, digest: str | None) -> None:
    el = ET.SubElement(metadata, f"{{{LIBVIRT_METADATA_NS}}}owner")
    for key in ("namespace", "name", "uid"):
        ET.SubElement(el, f"{{{LIBVIRT_METADATA_NS}}}{key}").text = getattr(owner, key)
    if digest is not None:
        ET.SubElement(el, f"{{{LIBVIRT_METADATA_NS}}}spec-hash").text = digest


def _os(os_el: ET.Element, spec: DomainSpec) -> None:
    firmware = spec.firmware
    if firmware is not None and firmware.secure:
        _sub(os_el, "type", "hvm", arch="x86_64", machine="q35")  # Secure Boot needs SMM: q35
    else:
        _sub(os_el, "type", "hvm", arch="x86_64")
    if firmware is not None:
        loader = {"readonly": "yes", "type": firmware.kind}
        if firmware.kind == "pflash":
            loader["secure"] = "yes" if firmware.secure else "no"
        _sub(os_el, "loader", str(firmware.loader), **loader)
        if firmware.nvram is not None:
            nvram = {"template": str(firmware.nvram_template)} if firmware.nvram_template else {}
            _sub(os_el, "nvram", str(firmware.nvram), **nvram)
    if spec.kernel is None:
        return
    _sub(os_el, "kernel", str(spec.kernel.kernel))
    if spec.kernel.initrd is not None:
        _sub(os_el, "initrd", str(spec.kernel.initrd))
    if spec.kernel.cmdline:
        _sub(os_el, "cmdline", spec.kernel.cmdline)


def _disks(devices: ET.Element, disks: tuple[DiskDevice, ...]) -> None:
    per_prefix: dict[str, int] = {}
    for disk in disks:
        prefix = _BUS_DEVICE_PREFIX[disk.bus]
        index = per_prefix.get(prefix, 0)
        per_prefix[prefix] = index + 1
        el = _sub(devices, "disk", type="file", device=disk.device)
        _sub(el, "driver", name="qemu", type=disk.driver_type)
        _sub(el, "source", file=str(disk.path))
        _sub(el, "target", dev=_device_name(disk.bus, index), bus=disk.bus)
        if disk.read_only:
            _sub(el, "readonly")
        if disk.boot_order is not None:
            _sub(el, "boot", order=str(disk.boot_order))
        _sub(el, "alias", name=f"ua-disk-{disk.name}")


def _interfaces(devices: ET.Element, interfaces: tuple[InterfaceDevice, ...]) -> None:
    for iface in interfaces:
        el = _sub(devices, "interface", type="network")
        _sub(el, "source", network=libvirt_network(iface.network))
        _sub(el, "mac", address=iface.mac)
        _sub(el, "model", type=iface.model)
        # libvirt's anti-spoofing filter (frames only from this MAC and packets only from the
        # assigned IP, so a guest cannot take another guest's address on the network; without
        # an assignment, a bridge network, libvirt learns the guest's first address instead),
        # and no TCP to the node's own ports (guard_xml.py).
        filterref = _sub(el, "filterref", filter=GUEST_FILTER)
        _sub(filterref, "parameter", name="MAC", value=iface.mac)
        if iface.ip is not None:
            _sub(filterref, "parameter", name="IP", value=iface.ip)
        _sub(el, "alias", name=f"ua-net-{iface.name}")


def _guest_agent(devices: ET.Element) -> None:
    """The virtio-serial channel qemu-guest-agent listens on (libvirt makes its host socket):
    guestAgentPing probes, addresses and OS info from the guest, freezes for snapshots."""
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "target", type="virtio", name="org.qemu.guest_agent.0")


def _console(devices: ET.Element, spec: DomainSpec) -> None:
    """Serial console appended to a log file the agent (and `kubectl vm console`) can read."""
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=str(spec.console_log), append="on")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="file")
    _sub(console, "source", path=str(spec.console_log), append="on")
    _sub(console, "target", type="serial", port="0")


@dataclass(frozen=True)
class DomainMetadata:
    owner: Owner
    spec_hash: str | None


@dataclass(frozen=True)
class ObservedDisk:
    file: str | None  # the source file
    target: str | None  # the guest's device name (vda)
    readonly: bool
    index: str | None  # libvirt's source index, in a running domain's live XML


@dataclass(frozen=True)
class DomainObserved:
    """What the agent reads back from a domain's XML, in one parse (``observe``)."""

    metadata: DomainMetadata | None = None  # None: not a domain of ours
    disks: tuple[ObservedDisk, ...] = ()
    logs: tuple[str, ...] = ()  # the serial's and the console's log files, serial first
    networks: frozenset[str] = frozenset()  # the libvirt networks its interfaces use
    nvram: str | None = None  # a UEFI domain's variables file

    @property
    def console_log(self) -> str | None:
        """The file the domain logs its serial console to, if any."""
        return self.logs[0] if self.logs else None

    @property
    def block_nodes(self) -> dict[str, str]:
        """Disk file -> QEMU block node name, from a running domain's live XML: libvirt names
        the format node of the disk whose source has index N ``libvirt-N-format``."""
        return {d.file: f"libvirt-{d.index}-format" for d in self.disks if d.file and d.index}

    @property
    def readonly_targets(self) -> list[str]:
        """Target names of the read-only disks (the cloud-init seed): left out of snapshots."""
        return [d.target for d in self.disks if d.readonly and d.target]

    @property
    def file_paths(self) -> list[str]:
        """Every host file the domain names: disk sources, serial and console logs."""
        return [d.file for d in self.disks if d.file] + list(self.logs)


def observe(xml: str) -> DomainObserved:
    """A domain's XML, as libvirt gives it, read once; XML that does not parse reads as a
    domain that names nothing."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 - libvirt's own output, not user input
    except ET.ParseError:
        return DomainObserved()
    disks = []
    for disk in root.iterfind("./devices/disk"):
        source, target = disk.find("source"), disk.find("target")
        disks.append(
            ObservedDisk(
                file=source.get("file") if source is not None else None,
                target=target.get("dev") if target is not None else None,
                readonly=disk.find("readonly") is not None,
                index=source.get("index") if source is not None else None,
            )
        )
    logs = tuple(
        str(el.get("path"))
        for tag in ("serial", "console")
        for el in root.iterfind(f"./devices/{tag}/source")
        if el.get("path")
    )
    networks = frozenset(
        str(source.get("network"))
        for source in root.iterfind("./devices/interface[@type='network']/source")
        if source.get("network")
    )
    nvram = root.find("./os/nvram")
    return DomainObserved(
        metadata=_metadata(root),
        disks=tuple(disks),
        logs=logs,
        networks=networks,
        nvram=(nvram.text or "").strip() or None if nvram is not None else None,
    )


def _metadata(root: ET.Element) -> DomainMetadata | None:
    owner = root.find(f"metadata/{{{LIBVIRT_METADATA_NS}}}owner")
    if owner is None:
        return None
    values = {key: owner.findtext(f"{{{LIBVIRT_METADATA_NS}}}{key}") for key in ("namespace", "name", "uid")}
    if not all(values.values()):
        return None
    return DomainMetadata(
        owner=Owner(namespace=values["namespace"] or "", name=values["name"] or "", uid=values["uid"] or ""),
        spec_hash=owner.findtext(f"{{{LIBVIRT_METADATA_NS}}}spec-hash"),
    )
