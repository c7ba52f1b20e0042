"""The binder's IPAM collaborator: what makes each VM's guest distinct on the cluster, given at
binding and kept for the VM's life: its addresses on each VmNetwork (ipam.py), its MACs, unique
per network (macs.py), and its QEMU's uid (qemu_uids.py); and the VmNetworks and namespaces a
VM's interfaces are judged against (networks.py). Pure and not locked: the binder calls it
under its own lock, so two decisions never hand out one address."""

from typing import Any

from formation_vmm.api.admission import change_held
from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import ADMITTED_ANNOTATION, DEFAULT_NETWORK
from formation_vmm.controller.binding.networks import NetworkCatalog, NetworkRefusal
from formation_vmm.domain.build import interface_mac
from formation_vmm.ipam import AddressBook, assigned
from formation_vmm.macs import MacBook, recorded_macs
from formation_vmm.qemu_uids import UidBook, recorded_uid

Body = dict[str, Any]
Addresses = dict[str, tuple[str, str]]  # interface -> (network, address)


class Identities:
    def __init__(self, networks: NetworkCatalog | None = None) -> None:
        self.networks = networks or NetworkCatalog()
        self.addresses = AddressBook()
        self.macs = MacBook()
        self.qemu_uids = UidBook()

    def record(self, uid: str, body: Body) -> None:
        """What a VM's object records: its QEMU uid and its addresses (bound or not; one outside
        its network's range is not believed)."""
        self.qemu_uids.record(uid, recorded_uid(body["metadata"].get("annotations") or {}))
        self.addresses.record(uid, assigned(body), self.networks.ranges())

    def record_macs(self, uid: str, body: Body, vm: VirtualMachine) -> None:
        """The MACs of a bound VM: those of its domain when all of its spec is admitted; else
        those its record names, for the interfaces it still has."""
        if wholly_admitted(body, vm):
            self.macs.record(uid, macs_of(vm))
        else:
            recorded = recorded_macs(vm.metadata.annotations)
            networks = {n.name: n.network or DEFAULT_NETWORK for n in vm.spec.networks}
            self.macs.record(uid, {i: (networks[i], m) for i, m in recorded.items() if i in networks})

    def refusal(self, vm: VirtualMachine) -> NetworkRefusal | None:
        return self.networks.refusal(vm)

    def assign(self, uid: str, vm: VirtualMachine, kept: dict[str, str]) -> tuple[dict[str, str], Addresses]:
        """MACs and addresses for every interface of ``vm`` (``kept``: MACs it keeps). Raises
        MacInUseError or AddressesExhaustedError, having taken no MAC then."""
        macs = self.macs.assign(uid, mac_asks(vm), kept)
        try:
            return macs, self.addresses.assign(uid, self.networks.interfaces(vm), self.networks.ranges())
        except Exception:
            self.macs.release(uid)
            raise

    def assign_uid(self, uid: str) -> int:
        return self.qemu_uids.assign(uid)

    def as_recorded(self, uid: str, body: Body) -> None:
        """Back to what the VM's object records (a decision that assigned and then refused, or
        whose write lost to a newer version)."""
        self.addresses.release(uid)
        self.addresses.record(uid, assigned(body), self.networks.ranges())
        self.record_macs(uid, body, VirtualMachine.model_validate(body))

    def unbind(self, uid: str, body: Body) -> None:
        """A binding that was not written: its MACs and QEMU uid go, its addresses are what the
        object records."""
        self.addresses.release(uid)
        self.addresses.record(uid, assigned(body), self.networks.ranges())
        self.macs.release(uid)
        self.qemu_uids.release(uid)

    def release(self, uid: str) -> None:
        """A VM gone."""
        self.addresses.release(uid)
        self.macs.release(uid)
        self.qemu_uids.release(uid)


def wholly_admitted(body: Body, vm: VirtualMachine) -> bool:
    """Whether the VM's spec is admitted as it is: a record, and for this spec's digest."""
    annotations = body["metadata"].get("annotations") or {}
    return ADMITTED_ANNOTATION in annotations and not change_held(annotations, vm.spec)


def mac_asks(vm: VirtualMachine) -> list[tuple[str, str, str | None]]:
    """(interface, network, the MAC its spec names or None) of each interface."""
    return [(net.name, net.network or DEFAULT_NETWORK, net.mac_address) for net in vm.spec.networks]


def macs_of(vm: VirtualMachine) -> dict[str, tuple[str, str]]:
    """iface -> (network, MAC) of an admitted VM, as its domain has them."""
    return {net.name: (net.network or DEFAULT_NETWORK, interface_mac(vm, net)) for net in vm.spec.networks}
