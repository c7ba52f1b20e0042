"""The nwfilters that keep a node's own ports out of its guests' reach (issue 26, finding 7).
Pure.

Every guest interface refers to ``formation-vmm-guest``: libvirt's ``clean-traffic`` (frames
only from the interface's MAC, packets only from its address), and ``formation-vmm-node-ports``,
which drops the guest's TCP to the addresses and ports where the node's agent listens (its
public API, its migration relay). The second is the agent's to define, per node: redefining it
changes the rules of running guests at once (libvirt re-instantiates a filter on every
interface that uses it), so a new VmNetwork's gateway is covered without touching a domain.

Its chain (``ipv4-node``, priority -720) comes before clean-traffic's anti-spoofing one
(``ipv4-ip``, -710): a frame to a node port is dropped before any rule could accept it, and
every other frame returns to the root chain as it came."""

import ipaddress
import xml.etree.ElementTree as ET
from collections.abc import Iterable

GUEST_FILTER = "formation-vmm-guest"
NODE_PORTS_FILTER = "formation-vmm-node-ports"


def guest_filter_xml(uuid: str | None = None) -> str:
    root = ET.Element("filter", name=GUEST_FILTER, chain="root")
    if uuid:
        ET.SubElement(root, "uuid").text = uuid
    ET.SubElement(root, "filterref", filter="clean-traffic")
    ET.SubElement(root, "filterref", filter=NODE_PORTS_FILTER)
    return ET.tostring(root, encoding="unicode")


def node_ports_xml(addresses: Iterable[str], ports: Iterable[int], uuid: str | None = None) -> str:
    """Drop rules for every (address, port) pair: IPv4 addresses only (clean-traffic lets no
    other protocol out of a guest), each checked, so nothing else reaches libvirt's XML."""
    root = ET.Element("filter", name=NODE_PORTS_FILTER, chain="ipv4-node", priority="-720")
    if uuid:
        ET.SubElement(root, "uuid").text = uuid
    for address in sorted({str(ipaddress.IPv4Address(a)) for a in addresses}):
        for port in sorted({_port(p) for p in ports}):
            rule = ET.SubElement(root, "rule", action="drop", direction="out", priority="100")
            ET.SubElement(rule, "ip", dstipaddr=address, protocol="tcp", dstportstart=str(port))
    return ET.tostring(root, encoding="unicode")


def _port(port: int) -> int:
    if not 0 < int(port) < 65536:
        raise ValueError(f"not a TCP port: {port}")
    return int(port)
