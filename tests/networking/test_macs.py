"""The controller's MAC record (macs.py): unique on a network, kept for a VM's life, a holder's
MAC refused to another. Pure."""

import pytest

from formation_vmm.macs import MacBook, MacInUseError, decode_macs, derived_mac, encode_macs

pytestmark = pytest.mark.pure


def test_given_macs_are_recorded_and_kept() -> None:
    book = MacBook()
    given = book.assign("a", [("eth0", "default", None), ("eth1", "lan", "02:AA:00:00:00:01")], {})
    assert given == {"eth0": derived_mac("a", "eth0")}  # the one it asked for is its spec's
    assert book.holder("default", given["eth0"]) == "a" and book.holder("lan", "02:aa:00:00:00:01") == "a"
    assert book.assign("a", [("eth0", "default", None)], given) == given
    assert decode_macs(encode_macs(given)) == given
    assert decode_macs("eth0=02:aa:bb:cc:dd:ee,eth1=not-a-mac,=02:00:00:00:00:00") == {
        "eth0": "02:aa:bb:cc:dd:ee"
    }


def test_a_mac_another_vm_holds_on_the_network_is_refused_and_nothing_changes() -> None:
    book = MacBook()
    taken = book.assign("a", [("eth0", "default", None)], {})["eth0"]
    with pytest.raises(MacInUseError) as refused:
        book.assign("b", [("eth0", "default", None), ("eth1", "default", taken.upper())], {})
    assert (refused.value.holder, refused.value.interface, refused.value.mac) == ("a", "eth1", taken)
    assert book.holder("default", derived_mac("b", "eth0")) is None
    # On another network the same MAC is no one's.
    assert book.assign("b", [("eth0", "other", taken)], {}) == {}
    book.release("a")
    assert book.assign("c", [("eth0", "default", taken)], {}) == {}


def test_a_derived_mac_that_collides_takes_the_next_derivation() -> None:
    book = MacBook()
    book.assign("squatter", [("eth0", "default", derived_mac("b", "eth0"))], {})
    given = book.assign("b", [("eth0", "default", None)], {})
    assert given == {"eth0": derived_mac("b", "eth0", 1)}
