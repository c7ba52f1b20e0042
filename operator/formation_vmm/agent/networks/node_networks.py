"""The VmNetworks on this node: each realised as a libvirt network (defined, started,
autostarted; made again when it differs from its VmNetwork and no domain uses it; removed when
its VmNetwork is gone and no domain uses it), its static DHCP entries kept to the VMs of this
node, and its state reported in the VmNetwork's per-node status.

Fed by the VmNetwork watch; ``converge`` runs with the agent's resync and repairs whatever
changed behind our back. A VM waits (``require``) until every network it uses runs here.
"""

import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from formation_vmm.agent.hypervisor import HypervisorError
from formation_vmm.agent.hypervisor.networks import HypervisorNetworks, NetworkState
from formation_vmm.agent.vms.inputs import InputNotReadyError
from formation_vmm.api.models import NetworkNodeStatus, VirtualMachine, VmNetwork, VmNetworkStatus
from formation_vmm.api.names import DEFAULT_NETWORK, bridge_device, libvirt_network
from formation_vmm.domain.build import assigned_addresses, interface_mac
from formation_vmm.domain.network_xml import DhcpHost, dhcp_hosts, network_xml, shape
from formation_vmm.ipam import address_range
from formation_vmm.kube import StatusWriter

log = logging.getLogger(__name__)

# libvirt's words for the failures an admin can fix, and the reason we show for each.
_REASONS = (
    ("already in use", "AddressInUse"),
    ("is already using", "AddressInUse"),
    ("No such device", "BridgeMissing"),
    ("no bridge named", "BridgeMissing"),
    ("Cannot get interface MTU", "BridgeMissing"),
)


def failure_reason(message: str) -> str:
    return next((reason for words, reason in _REASONS if words in message), "LibvirtError")


def vm_hosts(vm: VirtualMachine) -> dict[str, DhcpHost]:
    """VmNetwork -> the static DHCP entry of each of the VM's interfaces with an assigned address."""
    addresses = assigned_addresses(vm)
    found = {}
    for net in vm.spec.networks:
        if net.name in addresses:
            host = DhcpHost(interface_mac(vm, net), addresses[net.name])
            found[net.network or DEFAULT_NETWORK] = host
    return found


def with_node(status: VmNetworkStatus, entry: NetworkNodeStatus) -> VmNetworkStatus:
    """The status with this node's entry replaced, and the count of nodes where it runs."""
    nodes = sorted([n for n in status.nodes if n.name != entry.name] + [entry], key=lambda n: n.name)
    ready = sum(1 for n in nodes if n.phase == "Ready")
    return VmNetworkStatus(nodes=nodes, nodes_ready=f"{ready}/{len(nodes)}")


class NodeNetworks:
    def __init__(
        self,
        libvirt: HypervisorNetworks,
        status: StatusWriter[VmNetworkStatus],
        node: str,
        vms: Callable[[], Iterable[VirtualMachine]],
    ) -> None:
        self.libvirt = libvirt
        self.status = status
        self.node = node
        self.vms = vms  # the VMs bound to this node, as the agent's cache holds them
        self._lock = threading.Lock()  # one realisation at a time (libvirt calls included)
        self._networks: dict[str, VmNetwork] = {}
        self._bodies: dict[str, dict[str, Any]] = {}
        self._failed: dict[str, str] = {}  # VmNetwork -> why it does not run here
        self._hosts: dict[str, set[DhcpHost]] = {}  # libvirt network -> its entries as last read

    # --- the watch ---------------------------------------------------------------------------

    def event(self, event_type: str | None, body: dict[str, Any]) -> None:
        network = VmNetwork.model_validate(body)
        name = network.metadata.name
        with self._lock:
            if event_type == "DELETED" or network.metadata.deletion_timestamp:
                self._networks.pop(name, None)
                self._bodies.pop(name, None)
                self._failed.pop(name, None)
                try:
                    self._remove_unused(self.libvirt.ours())
                except HypervisorError as exc:
                    log.warning("cannot list networks: %s", exc)
                return
            self._networks[name] = network
            self._bodies[name] = body
            try:
                ours = self.libvirt.ours()
            except HypervisorError as exc:
                log.warning("cannot list networks: %s", exc)
                return  # the next converge realises it
            self._realise(network, ours, self._wanted_hosts())

    # --- what a VM's sync asks ---------------------------------------------------------------

    def require(self, vm: VirtualMachine) -> None:
        """Every network of the VM runs here and hands out the VM's addresses; else the VM waits
        (InputNotReadyError, with the reason). Cheap when nothing changed: entries are compared
        with what was last read."""
        wanted = {net.network or DEFAULT_NETWORK for net in vm.spec.networks}
        if not wanted:
            return
        with self._lock:
            for name in sorted(wanted):
                if name not in self._networks:
                    raise InputNotReadyError(
                        "NetworkNotReady",
                        f"network {name!r} is not known on node {self.node} yet",
                        "NetworkReady",
                    )
                if name in self._failed:
                    raise InputNotReadyError(
                        "NetworkNotReady",
                        f"network {name!r} does not run on node {self.node}: {self._failed[name]}",
                        "NetworkReady",
                    )
            for name, host in vm_hosts(vm).items():
                self._add_host(libvirt_network(name), host)

    def release(self, vm: VirtualMachine) -> None:
        """The VM's entries go with its domain (its addresses may go to other VMs)."""
        with self._lock:
            for name, host in vm_hosts(vm).items():
                self._remove_host(libvirt_network(name), host)

    # --- the periodic pass -------------------------------------------------------------------

    def converge(self) -> None:
        """Realise every VmNetwork again (a network removed or stopped behind our back comes
        back), drop DHCP entries no VM of this node holds, remove unused leftovers."""
        with self._lock:
            try:
                ours = self.libvirt.ours()
            except HypervisorError as exc:
                log.warning("cannot list networks: %s", exc)
                return
            wanted = self._wanted_hosts()
            for network in list(self._networks.values()):
                self._realise(network, ours, wanted)
            self._remove_unused(ours)

    def gateways(self) -> list[str]:
        """The node's own address on each nat or isolated VmNetwork (node_guard.py)."""
        with self._lock:
            ranges = [address_range(n.spec) for n in self._networks.values()]
        return [str(rng.gateway) for rng in ranges if rng is not None]

    def failures(self) -> dict[str, str]:
        with self._lock:
            return dict(self._failed)

    # --- internals (under the lock) ----------------------------------------------------------

    def _wanted_hosts(self) -> dict[str, set[DhcpHost]]:
        """VmNetwork -> the DHCP entries of this node's VMs on it."""
        hosts: dict[str, set[DhcpHost]] = {}
        for vm in self.vms():
            for name, host in vm_hosts(vm).items():
                hosts.setdefault(name, set()).add(host)
        return hosts

    def _realise(
        self, network: VmNetwork, ours: dict[str, NetworkState], all_wanted: dict[str, set[DhcpHost]]
    ) -> None:
        """Make the network as its VmNetwork says, given libvirt's networks as read at the start
        of this pass (``ours``) and the DHCP entries of every VM here."""
        name = network.metadata.name
        target = libvirt_network(name)
        try:
            bridge = network.spec.bridge
            if network.spec.mode == "bridge" and bridge and not self.libvirt.bridge_present(bridge):
                raise HypervisorError(f"node {self.node} has no bridge named {bridge} (the admin makes it)")
            wanted = all_wanted.get(name, set()) if network.spec.mode != "bridge" else set()
            xml = network_xml(name, network.spec, tuple(wanted))
            current = ours.get(target)
            if current is not None and shape(current.xml) != shape(xml):
                users = self.libvirt.users().get(target, set())
                if users:
                    raise HypervisorError(
                        f"libvirt network {target} differs from VmNetwork {name} and domains use it "
                        f"({', '.join(sorted(users))}); it is made again once they stop"
                    )
                log.info("network %s differs from its VmNetwork: making it again", target)
                self.libvirt.remove(target)
                current = None
            if current is None:
                self.libvirt.define(xml)
                self._hosts[target] = set(wanted)
            else:
                have = dhcp_hosts(current.xml)
                self._hosts[target] = have
                for host in sorted(wanted - have):
                    self._add_host(target, host)
                # An entry whose MAC belongs to no VM here: a VM deleted while we were away.
                for host in sorted(have - wanted):
                    self._remove_host(target, host)
            self.libvirt.start(target)
        except HypervisorError as exc:
            message = str(exc)
            if self._failed.get(name) != message:
                log.warning("network %s on %s: %s", name, self.node, message)
            self._failed[name] = message
            entry = NetworkNodeStatus(
                name=self.node, phase="Failed", reason=failure_reason(message), message=message[:500]
            )
            self._report(name, entry)
            return
        self._failed.pop(name, None)
        bridge = network.spec.bridge if network.spec.mode == "bridge" else bridge_device(name)
        self._report(name, NetworkNodeStatus(name=self.node, phase="Ready", bridge=bridge))

    def _add_host(self, target: str, host: DhcpHost) -> None:
        have = self._hosts.setdefault(target, set())
        if host in have:
            return
        # An entry for the same MAC or address with the other half different is replaced.
        for old in [h for h in have if h.mac == host.mac or h.ip == host.ip]:
            self._remove_host(target, old)
        self.libvirt.add_host(target, host)
        have.add(host)

    def _remove_host(self, target: str, host: DhcpHost) -> None:
        have = self._hosts.setdefault(target, set())
        try:
            self.libvirt.remove_host(target, host)
        except HypervisorError as exc:
            log.info("network %s: entry %s was not there: %s", target, host, exc)
        have.discard(host)

    def _remove_unused(self, ours: dict[str, NetworkState]) -> None:
        """Networks of ours whose VmNetwork is gone, once no domain uses them. The domains' XML
        is read only when there is such a network: not on every pass."""
        leftovers = set(ours) - {libvirt_network(name) for name in self._networks}
        if not leftovers:
            return
        try:
            users = self.libvirt.users()
            for target in sorted(leftovers):
                if users.get(target):
                    continue  # domains still use it: removed after they go
                log.info("removing network %s: its VmNetwork is gone and no domain uses it", target)
                self.libvirt.remove(target)
                self._hosts.pop(target, None)
        except HypervisorError as exc:
            log.warning("cannot remove unused networks: %s", exc)

    def _report(self, name: str, entry: NetworkNodeStatus) -> None:
        body = self._bodies.get(name)
        if body is None:
            return
        current = VmNetworkStatus.model_validate(body.get("status") or {})
        if next((n for n in current.nodes if n.name == self.node), None) == entry:
            return  # said already
        try:
            written = self.status.write(body, lambda st: with_node(st, entry))
        except Exception:  # the API is down: said on the next pass
            log.exception("cannot report network %s", name)
            return
        if written is not None:
            self._bodies[name] = written
