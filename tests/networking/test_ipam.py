"""The controller's IPAM (ipam.py): ranges, no address twice, the cursor, restarts."""

import ipaddress

import pytest

from formation_vmm.api.models import VmNetworkSpec
from formation_vmm.api.names import ADDRESSES_ANNOTATION
from formation_vmm.ipam import (
    AddressBook,
    AddressesExhaustedError,
    address_range,
    assigned,
    decode_addresses,
    encode_addresses,
)

pytestmark = pytest.mark.pure


def spec(**kw: object) -> VmNetworkSpec:
    return VmNetworkSpec.model_validate({"mode": "nat", **kw})


def test_the_default_range_is_the_subnet_but_gateway_network_and_broadcast() -> None:
    rng = address_range(spec(subnet="10.123.0.0/24"))
    assert rng is not None
    assert (str(rng.gateway), str(rng.first), str(rng.last), rng.size) == (
        "10.123.0.1",
        "10.123.0.2",
        "10.123.0.254",
        253,
    )


def test_a_range_never_includes_the_gateway_and_bridge_mode_has_none() -> None:
    rng = address_range(spec(subnet="10.0.0.0/29", dhcpRange={"start": "10.0.0.1", "end": "10.0.0.7"}))
    assert rng is not None and (str(rng.first), str(rng.last)) == ("10.0.0.2", "10.0.0.6")
    assert address_range(VmNetworkSpec(mode="bridge", bridge="br0")) is None


def test_a_burst_gets_distinct_addresses_inside_the_range() -> None:
    book = AddressBook()
    rng = address_range(spec(subnet="10.1.0.0/22"))
    got = [book.assign(f"uid-{i}", [("eth0", "net")], {"net": rng})["eth0"][1] for i in range(1000)]
    assert len(set(got)) == 1000
    assert all(ipaddress.ip_address(a) in ipaddress.ip_network("10.1.0.0/22") for a in got)
    assert "10.1.0.1" not in got  # the gateway


def test_a_full_range_refuses_and_assigns_nothing_then_a_deletion_frees_one() -> None:
    book = AddressBook()
    ranges = {
        "small": address_range(spec(subnet="10.2.0.0/29")),
        "big": address_range(spec(subnet="10.3.0.0/24")),
    }
    for i in range(5):  # .2 .. .6
        book.assign(f"uid-{i}", [("eth0", "small")], ranges)
    with pytest.raises(AddressesExhaustedError, match="network 'small' has no free address left"):
        book.assign("late", [("eth0", "big"), ("eth1", "small")], ranges)
    assert book.count("big") == 0  # the VM's other interface got nothing either
    freed = book.addresses_of("uid-3")["eth0"]
    book.release("uid-3")
    assert book.assign("late", [("eth0", "small")], ranges)["eth0"] == freed


def test_a_freed_address_is_reused_only_after_the_rest_of_the_range() -> None:
    book = AddressBook()
    ranges = {"n": address_range(spec(subnet="10.4.0.0/24"))}
    first = book.assign("a", [("eth0", "n")], ranges)["eth0"][1]
    book.release("a")
    assert book.assign("b", [("eth0", "n")], ranges)["eth0"][1] != first


def test_assigning_again_keeps_what_a_vm_holds() -> None:
    book = AddressBook()
    ranges = {"n": address_range(spec(subnet="10.5.0.0/24"))}
    once = book.assign("a", [("eth0", "n")], ranges)
    assert book.assign("a", [("eth0", "n")], ranges) == once
    assert book.count("n") == 1


def test_the_binding_records_assignments_in_an_annotation_a_restart_reads_back() -> None:
    given = {"eth1": ("m", "10.7.0.9"), "eth0": ("n", "10.6.0.2")}
    value = encode_addresses(given)
    assert value == "eth0=n/10.6.0.2,eth1=m/10.7.0.9"  # the form the admission policy splits
    assert decode_addresses(value) == given
    body = {
        "metadata": {"annotations": {ADDRESSES_ANNOTATION: value}},
        # The annotation is the record; what the status shows does not override it.
        "status": {
            "interfaces": [{"name": "eth0", "network": "n", "ipAddress": "10.6.0.77", "infoSource": "ipam"}]
        },
    }
    assert assigned(body) == given
    assert decode_addresses("eth0=n/10.6.0.2,garbage,=x/y") == {"eth0": ("n", "10.6.0.2")}


def test_a_status_is_never_read_as_a_record_and_a_record_outside_the_range_is_not_believed() -> None:
    """The status shows assignments; only the annotation (the controller's alone) records them.
    A status claiming an address through IPAM holds nothing, and a record naming the gateway,
    or an address outside the range, is not taken in (issue 26, finding 2)."""
    body = {
        "status": {
            "interfaces": [
                {"name": "eth0", "network": "n", "ipAddress": "10.6.0.2", "infoSource": "ipam, lease"}
            ]
        }
    }
    assert assigned(body) == {}
    ranges = {"n": address_range(spec(subnet="10.6.0.0/24"))}
    book = AddressBook()
    book.record("old", {"eth0": ("n", "10.6.0.2")}, ranges)
    got = book.assign("new", [("eth0", "n")], ranges)
    assert got["eth0"] == ("n", "10.6.0.3")
    # A second VM claiming the same address (it cannot happen; if it did) does not take it.
    book.record("intruder", {"eth0": ("n", "10.6.0.2")}, ranges)
    assert book.holder("n", "10.6.0.2") == "old"
    for address in ("10.6.0.1", "10.6.0.0", "10.6.0.255", "10.9.0.5", "not-an-address"):
        book.record("forger", {"eth0": ("n", address)}, ranges)
        assert book.holder("n", address) is None, address
