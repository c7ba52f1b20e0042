"""Which VmNetworks exist and which namespaces may use them, as the controller's watches tell
(VmNetworks and Namespaces): the binder asks before it places a VM and assigns its addresses.
Pure: what a deleted Node's entry leaves of a VmNetwork's status (network_status.py writes it)."""

import threading
from dataclasses import dataclass
from typing import Any

from formation_vmm.api.models import VirtualMachine, VmNetwork, VmNetworkStatus
from formation_vmm.api.names import DEFAULT_NETWORK
from formation_vmm.api.selectors import matches
from formation_vmm.ipam import AddressRange, address_range


def without_node(status: VmNetworkStatus, node: str) -> VmNetworkStatus | None:
    """The status without ``node``'s entry, and its count of nodes where the network runs; None
    when it has no such entry."""
    nodes = [n for n in status.nodes if n.name != node]
    if len(nodes) == len(status.nodes):
        return None
    ready = sum(1 for n in nodes if n.phase == "Ready")
    return VmNetworkStatus(nodes=nodes, nodes_ready=f"{ready}/{len(nodes)}")


@dataclass(frozen=True)
class NetworkRefusal:
    reason: str  # NetworkNotFound, NetworkNotAllowed
    message: str


class NetworkCatalog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._networks: dict[str, VmNetwork] = {}
        self._namespaces: dict[str, dict[str, str]] = {}  # name -> labels
        self._ranges: dict[str, AddressRange | None] | None = None  # from _networks, made on demand

    def network_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        network = VmNetwork.model_validate(body)
        with self._lock:
            if event_type == "DELETED" or network.metadata.deletion_timestamp:
                self._networks.pop(network.metadata.name, None)
            else:
                self._networks[network.metadata.name] = network
            self._ranges = None

    def namespace_event(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        with self._lock:
            if event_type == "DELETED":
                self._namespaces.pop(meta["name"], None)
            else:
                self._namespaces[meta["name"]] = dict(meta.get("labels") or {})

    def interfaces(self, vm: VirtualMachine) -> list[tuple[str, str]]:
        """(interface, VmNetwork) of each of the VM's interfaces."""
        return [(net.name, net.network or DEFAULT_NETWORK) for net in vm.spec.networks]

    def refusal(self, vm: VirtualMachine) -> NetworkRefusal | None:
        """Why the VM may not use one of the networks it names, or None."""
        namespace = vm.metadata.namespace or ""
        with self._lock:
            labels = self._namespaces.get(namespace, {})
            for iface, name in self.interfaces(vm):
                network = self._networks.get(name)
                if network is None:
                    return NetworkRefusal(
                        "NetworkNotFound",
                        f"interface {iface!r} names network {name!r}, and there is no VmNetwork of that "
                        f"name (networks: {', '.join(sorted(self._networks)) or 'none'})",
                    )
                if not matches(network.spec.namespace_selector, labels):
                    return NetworkRefusal(
                        "NetworkNotAllowed",
                        f"interface {iface!r} names network {name!r}, which namespace {namespace!r} may "
                        "not use (its namespaceSelector does not match the namespace's labels)",
                    )
        return None

    def ranges(self) -> dict[str, AddressRange | None]:
        """VmNetwork -> the range IPAM assigns from (kept between changes: read on every VM
        event, to check what a record says)."""
        with self._lock:
            if self._ranges is None:
                self._ranges = {name: address_range(net.spec) for name, net in self._networks.items()}
            return self._ranges
