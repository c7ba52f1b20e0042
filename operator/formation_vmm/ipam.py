"""Addresses for VM interfaces on VmNetworks: the controller's IPAM. Pure.

The record of an assignment is the VM itself: the annotation ``vmm.formation.cloud/addresses``
(``eth0=default/10.123.0.5,...``), written in the same request that binds the VM (labels,
finalizer and addresses are one write; the agent copies them into ``status.interfaces`` with
``infoSource: ipam`` in its own status write). No second store to keep in step, and a restarted
controller learns every assignment back from the VMs it lists before it binds anything. Only
the controller may set the annotation (admission policy formation-vmm-placement).

Addresses are handed out from a cursor that moves on, so an address freed by a deleted VM goes
to a new VM only after the rest of the range was used (a guest's neighbours forget the old MAC
by then).
"""

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from formation_vmm.api.models import VmNetworkSpec
from formation_vmm.api.names import ADDRESSES_ANNOTATION

IPAM = "ipam"


@dataclass(frozen=True)
class AddressRange:
    """What a nat or isolated VmNetwork hands out: ``first``..``last``; the subnet's first host
    is the node's own address on it (the gateway, and the DHCP server)."""

    subnet: ipaddress.IPv4Network
    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def size(self) -> int:
        return int(self.last) - int(self.first) + 1


def address_range(spec: VmNetworkSpec) -> AddressRange | None:
    """The range of a nat or isolated network (None for bridge mode: the admin's LAN assigns)."""
    if spec.mode == "bridge" or spec.subnet is None:
        return None
    subnet = ipaddress.IPv4Network(spec.subnet, strict=False)
    if spec.dhcp_range is not None:
        first = ipaddress.IPv4Address(spec.dhcp_range.start)
        last = ipaddress.IPv4Address(spec.dhcp_range.end)
    else:
        first, last = subnet.network_address + 2, subnet.broadcast_address - 1
    # The gateway is never a VM's, whatever the range says.
    if first <= subnet.network_address + 1:
        first = subnet.network_address + 2
    return AddressRange(subnet, first, min(last, subnet.broadcast_address - 1))


def encode_addresses(assignments: Mapping[str, tuple[str, str]]) -> str:
    """The annotation's value: ``iface=network/address`` joined by commas, in interface order
    (a form the admission policy's CEL can split and compare)."""
    return ",".join(f"{iface}={net}/{ip}" for iface, (net, ip) in sorted(assignments.items()))


def decode_addresses(value: str) -> dict[str, tuple[str, str]]:
    """The annotation read back; malformed entries are skipped (only the controller writes it)."""
    found = {}
    for item in value.split(","):
        iface, _, rest = item.strip().partition("=")
        net, _, ip = rest.partition("/")
        if iface and net and ip:
            found[iface] = (net, ip)
    return found


def assigned(body: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """interface name -> (network, address) the controller assigned: its annotation, and never
    anything else (the status shows the assignment, and is never read back as its record)."""
    annotations = (body.get("metadata") or {}).get("annotations") or {}
    return decode_addresses(str(annotations.get(ADDRESSES_ANNOTATION) or ""))


def assignable(network: str, address: str, ranges: Mapping[str, "AddressRange | None"]) -> bool:
    """Whether ``address`` is one IPAM could have given on ``network``: inside its range (never
    its gateway, network or broadcast address). A record that says otherwise is not believed."""
    rng = ranges.get(network)
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return False
    return rng is not None and rng.first <= ip <= rng.last and ip != rng.gateway


def from_ipam(info_source: str | None) -> bool:
    """Whether an interface's address is the controller's assignment (infoSource begins with
    ipam; lease and guest-agent join it when they confirm)."""
    return (info_source or "").split(",", maxsplit=1)[0].strip() == IPAM


class AddressesExhaustedError(ValueError):
    pass


class AddressBook:
    """Who holds which address of which network. Not thread-safe: the binder holds its lock."""

    def __init__(self) -> None:
        self._holders: dict[tuple[str, str], str] = {}  # (network, address) -> VM uid
        self._held: dict[str, dict[str, tuple[str, str]]] = {}  # uid -> interface -> (network, address)
        self._cursor: dict[str, int] = {}  # network -> the next address to try, as an int

    def holder(self, network: str, address: str) -> str | None:
        return self._holders.get((network, address))

    def addresses_of(self, uid: str) -> dict[str, tuple[str, str]]:
        return dict(self._held.get(uid, {}))

    def count(self, network: str) -> int:
        return sum(1 for net, _ in self._holders if net == network)

    def record(
        self,
        uid: str,
        assignments: Mapping[str, tuple[str, str]],
        ranges: Mapping[str, AddressRange | None] | None = None,
    ) -> None:
        """A VM's assignments as its record shows them (the watch, a restart's listing). An
        address another VM holds already stays that VM's: the first record wins. With
        ``ranges``, an address outside its network's range (the gateway's) is not taken in."""
        for iface, key in assignments.items():
            if ranges is not None and key[0] in ranges and not assignable(*key, ranges):
                continue
            holder = self._holders.setdefault(key, uid)
            if holder == uid:
                self._held.setdefault(uid, {})[iface] = key

    def release(self, uid: str) -> None:
        for key in self._held.pop(uid, {}).values():
            if self._holders.get(key) == uid:
                del self._holders[key]

    def assign(
        self, uid: str, interfaces: Iterable[tuple[str, str]], ranges: Mapping[str, AddressRange | None]
    ) -> dict[str, tuple[str, str]]:
        """An address for each (interface, network) that needs one, keeping what ``uid`` holds
        already on the same network; raises AddressesExhaustedError when a range is full, and
        then assigns nothing."""
        held = self._held.get(uid, {})
        result: dict[str, tuple[str, str]] = {}
        taken: list[tuple[str, str]] = []
        try:
            for iface, network in interfaces:
                rng = ranges.get(network)
                if rng is None:
                    continue  # bridge mode: the address comes from the admin's LAN
                kept = held.get(iface)
                if kept is not None and kept[0] == network:
                    result[iface] = kept
                    continue
                key = (network, self._next_free(network, rng))
                self._holders[key] = uid
                taken.append(key)
                result[iface] = key
        except AddressesExhaustedError:
            for key in taken:
                del self._holders[key]
            raise
        self._held[uid] = result
        for iface, key in held.items():
            if result.get(iface) != key and self._holders.get(key) == uid:
                del self._holders[key]  # an interface that moved network, or went
        return result

    def _next_free(self, network: str, rng: AddressRange) -> str:
        start = self._cursor.get(network, int(rng.first))
        if not int(rng.first) <= start <= int(rng.last):
            start = int(rng.first)
        for step in range(rng.size):
            value = int(rng.first) + (start - int(rng.first) + step) % rng.size
            address = str(ipaddress.IPv4Address(value))
            if (network, address) not in self._holders:
                self._cursor[network] = value + 1
                return address
        raise AddressesExhaustedError(
            f"network {network!r} has no free address left (its range holds {rng.size})"
        )
