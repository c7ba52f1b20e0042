"""Keeps the node's own ports out of its guests' reach (issue 26, finding 7): the nwfilter
``formation-vmm-node-ports`` drops guest TCP to every address where the agent listens (its
public API, its migration relay) and to every VmNetwork's gateway (the node's own address on
the guests' bridge, where a guest reaches the node first). Defined at the agent's start (or as
soon as libvirtd answers), and again when the set changes (a new VmNetwork): libvirt applies a
redefined filter to the running guests at once."""

import ipaddress
import logging
from collections.abc import Callable, Iterable

from formation_vmm.agent.hypervisor import HypervisorError
from formation_vmm.agent.hypervisor.nwfilters import HypervisorFilters
from formation_vmm.agent.migration.relay import Relay
from formation_vmm.config import Settings
from formation_vmm.domain.guard_xml import GUEST_FILTER, NODE_PORTS_FILTER, guest_filter_xml, node_ports_xml

log = logging.getLogger(__name__)


def listen_address(host: str) -> str | None:
    """The IPv4 address a listener bound to ``host`` is reached at; None for a wildcard or a
    name (the chart binds the agent to the node's address, $(HOST_IP))."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if address.version != 4 or address.is_unspecified:
        return None
    return str(address)


class NodeGuard:
    def __init__(
        self,
        filters: HypervisorFilters,
        listening: Iterable[tuple[str, int]],
        gateways: Callable[[], Iterable[str]],
    ) -> None:
        self.filters = filters
        self.listening = [(listen_address(host), port) for host, port in listening if port]
        self.gateways = gateways
        self._applied: str | None = None

    @staticmethod
    def started(
        settings: Settings,
        filters: HypervisorFilters,
        relay: Relay | None,
        gateways: Callable[[], Iterable[str]],
    ) -> "NodeGuard | None":
        """The guard of this agent's ports (its API, its access port, its relay), defined now
        if libvirtd answers, else with the resync once it does (the chart's libvirtd pod may
        start after the agent's); libvirt's test driver runs no guest and has no nwfilters."""
        if settings.libvirt_uri.startswith("test:"):
            return None
        listening = [(settings.api_host, settings.api_port), (settings.api_host, settings.access_port)]
        if relay is not None:
            listening.append((relay.listen[0], relay.port))
        guard = NodeGuard(filters, listening, gateways)
        guard.refresh()
        return guard

    def ports(self) -> list[int]:
        return sorted({port for _, port in self.listening})

    def addresses(self) -> set[str]:
        return {a for a, _ in self.listening if a is not None} | set(self.gateways())

    def refresh(self) -> None:
        """Both filters, defined or brought up to date: at the agent's start, then with every
        resync (a new network's gateway; a libvirtd that did not answer yet). Until they are
        defined no guest starts without them: libvirt refuses to start a domain whose filter it
        does not know, and the sync tries again."""
        addresses, ports = self.addresses(), self.ports()
        rules = node_ports_xml(addresses, ports)
        if rules == self._applied:
            return
        try:
            self.filters.define(NODE_PORTS_FILTER, lambda uuid: node_ports_xml(addresses, ports, uuid))
            self.filters.define(GUEST_FILTER, guest_filter_xml)
        except HypervisorError as exc:
            log.warning("cannot keep guests off the node's ports yet: %s", exc)
            return
        self._applied = rules
        log.info("guests kept off ports %s of %s", ports, ", ".join(sorted(addresses)) or "no address")
