"""MAC addresses of VM interfaces on VmNetworks: the controller's record. Pure.

An interface's MAC is its ``macAddress``, else one the controller gives it when it binds the VM
(or admits an interface added later), recorded in the annotation ``vmm.formation.cloud/macs``
(``iface=mac`` joined by commas) in the same write, and kept for the VM's life. No two
interfaces on one network hold the same MAC: a duplicate would take the other's DHCP entry and
its frames (issue 26). A given MAC is derived from the VM's uid and the interface's name with
40 bits of a digest under a locally administered unicast prefix (``02``); on the rare collision
the next derivation is taken. Interfaces of VMs bound before the record existed keep the MAC
they were defined with: QEMU's ``52:54:00`` and 24 bits of the same digest (``legacy_mac``).
"""

import hashlib
import re
from collections.abc import Iterable, Mapping

from formation_vmm.api.names import MACS_ANNOTATION

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def legacy_mac(vm_uid: str, interface: str) -> str:
    """The MAC interfaces were given before the controller recorded MACs (52:54:00 is QEMU's
    locally administered prefix, and 24 bits collide at a few thousand VMs per network)."""
    digest = hashlib.sha256(f"{vm_uid}/{interface}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def derived_mac(vm_uid: str, interface: str, attempt: int = 0) -> str:
    """A MAC for the interface: 02 (locally administered, unicast) and 40 bits of a digest."""
    salt = f"/{attempt}" if attempt else ""
    digest = hashlib.sha256(f"{vm_uid}/{interface}{salt}".encode()).digest()
    return "02:" + ":".join(f"{b:02x}" for b in digest[:5])


def encode_macs(macs: Mapping[str, str]) -> str:
    return ",".join(f"{iface}={mac}" for iface, mac in sorted(macs.items()))


def decode_macs(value: str) -> dict[str, str]:
    """The annotation read back; entries that are not MACs are skipped."""
    found = {}
    for item in value.split(","):
        iface, _, mac = item.strip().partition("=")
        if iface and _MAC.match(mac.lower()):
            found[iface] = mac.lower()
    return found


def recorded_macs(annotations: Mapping[str, str]) -> dict[str, str]:
    return decode_macs(str(annotations.get(MACS_ANNOTATION) or ""))


class MacInUseError(ValueError):
    def __init__(self, interface: str, network: str, mac: str, holder: str) -> None:
        super().__init__(f"interface {interface!r} asks for MAC {mac} on network {network!r}")
        self.interface = interface
        self.network = network
        self.mac = mac
        self.holder = holder  # the uid of the VM that holds it


class MacBook:
    """Which VM holds which MAC on which network. Not thread-safe: the binder holds its lock."""

    def __init__(self) -> None:
        self._holders: dict[tuple[str, str], str] = {}  # (network, mac) -> VM uid
        self._held: dict[str, dict[str, tuple[str, str]]] = {}  # uid -> iface -> (network, mac)

    def holder(self, network: str, mac: str) -> str | None:
        return self._holders.get((network, mac.lower()))

    def record(self, uid: str, macs: Mapping[str, tuple[str, str]]) -> None:
        """A bound VM's MACs (iface -> (network, mac)) as its record and spec show them. The
        first holder of a MAC keeps it."""
        self.release(uid)
        held = {}
        for iface, (network, mac) in macs.items():
            key = (network, mac.lower())
            if self._holders.setdefault(key, uid) == uid:
                held[iface] = key
        self._held[uid] = held

    def release(self, uid: str) -> None:
        for key in self._held.pop(uid, {}).values():
            if self._holders.get(key) == uid:
                del self._holders[key]

    def assign(
        self,
        uid: str,
        interfaces: Iterable[tuple[str, str, str | None]],
        kept: Mapping[str, str],
    ) -> dict[str, str]:
        """The MAC of each (interface, network, asked-for MAC or None): the one asked for, else
        the one ``kept`` (the VM's record), else a new one. Raises MacInUseError when one asked
        for is another VM's on that network, and then changes nothing. Returns the MACs the
        controller gave (those asked for are the spec's, not recorded)."""
        wanted: dict[str, tuple[str, str]] = {}
        given: dict[str, str] = {}
        for iface, network, asked in interfaces:
            if asked:
                mac = asked.lower()
                holder = self.holder(network, mac)
                if holder not in (None, uid):
                    raise MacInUseError(iface, network, mac, holder)
            else:
                mac = kept.get(iface) or self._fresh(uid, iface, network, wanted)
                given[iface] = mac
            wanted[iface] = (network, mac)
        self.record(uid, wanted)
        return given

    def _fresh(self, uid: str, iface: str, network: str, taken: Mapping[str, tuple[str, str]]) -> str:
        for attempt in range(64):
            mac = derived_mac(uid, iface, attempt)
            if self.holder(network, mac) in (None, uid) and (network, mac) not in taken.values():
                return mac
        raise AssertionError("64 derivations of 40 bits all taken")  # pragma: no cover
