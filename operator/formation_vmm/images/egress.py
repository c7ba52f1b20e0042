"""Where image downloads may connect: an admin's policy of CIDR ranges. Pure.

By default a VmImage URL may not reach the node itself (loopback: the agent's API, the kubelet),
link-local addresses (cloud metadata services), private and shared ranges (the cluster's pods,
services and nodes, the management network), or multicast and reserved space. ``allow`` lists
ranges an admin opens anyway (a registry on the private network; the tests' loopback server);
``deny`` replaces the default refused ranges. An address is permitted when it is in ``allow`` or
in no range of ``deny``.
"""

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DENY = (
    "0.0.0.0/8",  # "this network"
    "10.0.0.0/8",  # private
    "100.64.0.0/10",  # shared (carrier-grade NAT; some clusters' pod ranges)
    "127.0.0.0/8",  # loopback: the node itself
    "169.254.0.0/16",  # link-local: cloud metadata
    "172.16.0.0/12",  # private
    "192.0.0.0/24",  # IETF protocol assignments
    "192.168.0.0/16",  # private
    "198.18.0.0/15",  # benchmarking
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
    "::/128",  # unspecified
    "::1/128",  # loopback
    "::ffff:0:0/96",  # IPv4-mapped: judged as the IPv4 address instead
    "64:ff9b::/96",  # NAT64 to anywhere
    "fc00::/7",  # unique local
    "fe80::/10",  # link-local
    "ff00::/8",  # multicast
)


class EgressError(ValueError):
    """A setting that is not a list of CIDR ranges."""


def networks(ranges: Iterable[str]) -> tuple[Network, ...]:
    found = []
    for text in ranges:
        try:
            found.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError as exc:
            raise EgressError(f"{text!r} is not a CIDR range such as 10.0.0.0/8") from exc
    return tuple(found)


@dataclass(frozen=True)
class EgressPolicy:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = networks(DEFAULT_DENY)

    @classmethod
    def from_settings(cls, allow: Sequence[str], deny: Sequence[str] | None) -> "EgressPolicy":
        return cls(networks(allow), networks(DEFAULT_DENY if deny is None else deny))

    def permits(self, address: Address) -> bool:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.allow):
            return True
        return not any(address in net for net in self.deny)

    def permits_all(self, addresses: Iterable[str]) -> bool:
        """Every address a name resolved to is permitted (a name that also points inside the
        cluster is refused, whichever address a connection would have used)."""
        parsed = [ipaddress.ip_address(a.split("%", 1)[0]) for a in addresses]
        return bool(parsed) and all(self.permits(a) for a in parsed)
