"""libvirt networks, for the agent's VmNetworks: defined, started, autostarted, their static DHCP
entries changed live (``virNetworkUpdate``: dnsmasq learns them without a restart, so guests on
the network keep their links), and removed."""

from dataclasses import dataclass

import libvirt

from formation_vmm.agent.hypervisor.connection import Hypervisor, hypervisor_error
from formation_vmm.api.names import LIBVIRT_NETWORK_PREFIX
from formation_vmm.domain.network_xml import DhcpHost
from formation_vmm.domain.xml import observe

_LIVE_AND_CONFIG = libvirt.VIR_NETWORK_UPDATE_AFFECT_LIVE | libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG


@dataclass(frozen=True)
class NetworkState:
    name: str  # libvirt's name (vmm-<VmNetwork>)
    xml: str  # as defined (inactive XML: what persists)
    active: bool
    autostart: bool


def _defined_xml(net: libvirt.virNetwork) -> str:
    """The network as defined (what persists), else as it runs: libvirt's test driver knows
    no INACTIVE flag (and keeps the two the same)."""
    try:
        return str(net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        return str(net.XMLDesc(0))


def _state_or_none(net: libvirt.virNetwork, name: str) -> NetworkState | None:
    """The network's state; None when it was removed after the listing named it (a VM's last
    network going as its VM goes: seen as a 500 from the agent's /networks)."""
    try:
        return NetworkState(name, _defined_xml(net), bool(net.isActive()), bool(net.autostart()))
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
            return None
        raise


class HypervisorNetworks:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hypervisor = hypervisor

    def ours(self) -> dict[str, NetworkState]:
        """The networks made from VmNetworks (by libvirt name); the host's own are not listed."""
        try:
            found = {}
            for net in self.hypervisor.connection().listAllNetworks():
                name = str(net.name())
                if name.startswith(LIBVIRT_NETWORK_PREFIX):
                    state = _state_or_none(net, name)
                    if state is not None:
                        found[name] = state
            return found
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, "cannot list networks") from exc

    def _network(self, name: str) -> libvirt.virNetwork:
        try:
            return self.hypervisor.connection().networkLookupByName(name)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"no network {name}") from exc

    def define(self, xml: str) -> None:
        try:
            self.hypervisor.connection().networkDefineXML(xml)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, "cannot define the network") from exc

    def start(self, name: str) -> None:
        """Start (if inactive) and autostart a network: it comes back with the node."""
        net = self._network(name)
        try:
            if not net.isActive():
                net.create()
            if not net.autostart():
                net.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot start network {name}") from exc

    def remove(self, name: str) -> None:
        net = self._network(name)
        try:
            if net.isActive():
                net.destroy()
            net.undefine()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                raise hypervisor_error(exc, f"cannot remove network {name}") from exc

    def bridge_present(self, bridge: str) -> bool:
        """Whether the host has network device ``bridge`` (as libvirtd sees it, in its own
        network namespace): libvirt starts a bridge-mode network without looking."""
        try:
            self.hypervisor.connection().interfaceLookupByName(bridge)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_INTERFACE:
                return False
            if exc.get_error_code() == libvirt.VIR_ERR_NO_SUPPORT:
                return True  # a libvirt without the interface driver: libvirt's word at domain start
            raise hypervisor_error(exc, f"cannot look for bridge {bridge}") from exc
        return True

    def add_host(self, name: str, host: DhcpHost) -> None:
        self._update(name, libvirt.VIR_NETWORK_UPDATE_COMMAND_ADD_LAST, host)

    def remove_host(self, name: str, host: DhcpHost) -> None:
        self._update(name, libvirt.VIR_NETWORK_UPDATE_COMMAND_DELETE, host)

    def _update(self, name: str, command: int, host: DhcpHost) -> None:
        net = self._network(name)
        flags = _LIVE_AND_CONFIG if net.isActive() else libvirt.VIR_NETWORK_UPDATE_AFFECT_CONFIG
        try:
            net.update(command, libvirt.VIR_NETWORK_SECTION_IP_DHCP_HOST, -1, host.xml(), flags)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot change the DHCP entries of network {name}") from exc

    def users(self) -> dict[str, set[str]]:
        """libvirt network -> the domains (any, ours or not) whose interfaces use it."""
        used: dict[str, set[str]] = {}
        try:
            for dom in self.hypervisor.connection().listAllDomains():
                try:
                    xml = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
                except libvirt.libvirtError:
                    continue  # undefined meanwhile
                for network in observe(xml).networks:
                    used.setdefault(network, set()).add(str(dom.name()))
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, "cannot list domains") from exc
        return used
