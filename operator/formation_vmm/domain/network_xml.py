"""VmNetwork -> libvirt network XML, and the static DHCP entries read back from it. Pure.

A nat or isolated network is a bridge of its own (``bridge_device``) with the subnet's first
address on the node and dnsmasq serving DHCP from the range; each VM's address is a static
``<host mac ip/>`` entry, so DHCP hands a guest exactly the address the controller assigned. A
bridge network joins an existing host bridge the admin names; its guests get addresses from
the admin's LAN.
"""

import xml.etree.ElementTree as ET
from dataclasses import dataclass

from formation_vmm.api.models import VmNetworkSpec
from formation_vmm.api.names import bridge_device, libvirt_network
from formation_vmm.ipam import address_range


@dataclass(frozen=True, order=True)
class DhcpHost:
    mac: str
    ip: str

    def xml(self) -> str:
        """The entry alone, as libvirt's network update takes it."""
        return ET.tostring(ET.Element("host", mac=self.mac, ip=self.ip), encoding="unicode")


def network_xml(name: str, spec: VmNetworkSpec, hosts: tuple[DhcpHost, ...] = ()) -> str:
    """The libvirt network for VmNetwork ``name`` (with its DHCP host entries)."""
    net = ET.Element("network")
    ET.SubElement(net, "name").text = libvirt_network(name)
    if spec.mode == "bridge":
        assert spec.bridge is not None  # the CRD requires it in bridge mode
        ET.SubElement(net, "forward", mode="bridge")
        ET.SubElement(net, "bridge", name=spec.bridge)
        return ET.tostring(net, encoding="unicode")
    rng = address_range(spec)
    assert rng is not None  # the CRD requires a subnet outside bridge mode
    if spec.mode == "nat":
        ET.SubElement(net, "forward", mode="nat")
    ET.SubElement(net, "bridge", name=bridge_device(name), stp="on", delay="0")
    ip = ET.SubElement(net, "ip", address=str(rng.gateway), netmask=str(rng.subnet.netmask))
    dhcp = ET.SubElement(ip, "dhcp")
    ET.SubElement(dhcp, "range", start=str(rng.first), end=str(rng.last))
    for host in sorted(hosts):
        ET.SubElement(dhcp, "host", mac=host.mac, ip=host.ip)
    return ET.tostring(net, encoding="unicode")


def dhcp_hosts(xml: str) -> set[DhcpHost]:
    """The static DHCP entries of a libvirt network's XML."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own output, not a tenant's
    return {
        DhcpHost(el.get("mac", "").lower(), el.get("ip", ""))
        for el in root.iterfind("./ip/dhcp/host")
        if el.get("mac") and el.get("ip")
    }


def shape(xml: str) -> tuple[str | None, str | None, str | None, str | None]:
    """What of a network must match its VmNetwork, hosts aside: (forward mode, bridge, address,
    netmask). A network whose shape differs is made again."""
    root = ET.fromstring(xml)  # noqa: S314 - libvirt's own output, not a tenant's
    forward = root.find("forward")
    bridge = root.find("bridge")
    ip = root.find("ip")
    return (
        forward.get("mode") if forward is not None else None,
        bridge.get("name") if bridge is not None else None,
        ip.get("address") if ip is not None else None,
        ip.get("netmask") if ip is not None else None,
    )
