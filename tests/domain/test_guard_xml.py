"""The node guard's nwfilters (domain/guard_xml.py) and which addresses it covers
(agent/networks/node_guard.py). Pure; a real guest kept off the agent's port is in
tests/security/test_guest_to_node.py."""

import xml.etree.ElementTree as ET

import pytest

from formation_vmm.agent.networks.node_guard import listen_address
from formation_vmm.domain.guard_xml import guest_filter_xml, node_ports_xml

pytestmark = pytest.mark.pure


def test_every_address_and_port_pair_is_dropped_before_the_anti_spoofing_chain() -> None:
    root = ET.fromstring(node_ports_xml(["10.0.0.1", "192.0.2.7", "10.0.0.1"], [3003, 16514], "u-1"))
    assert (root.get("chain"), int(root.get("priority") or 0)) == ("ipv4-node", -720)  # clean-traffic's: -710
    assert root.findtext("uuid") == "u-1"
    rules = [(r.get("action"), r.get("direction"), r[0].attrib) for r in root.iter("rule")]
    assert [(a, d, i["dstipaddr"], i["dstportstart"], i["protocol"]) for a, d, i in rules] == [
        ("drop", "out", "10.0.0.1", "3003", "tcp"),
        ("drop", "out", "10.0.0.1", "16514", "tcp"),
        ("drop", "out", "192.0.2.7", "3003", "tcp"),
        ("drop", "out", "192.0.2.7", "16514", "tcp"),
    ]


def test_only_addresses_and_ports_reach_the_filter() -> None:
    with pytest.raises(ValueError):
        node_ports_xml(["10.0.0.1'/><rule action='accept"], [3003])
    with pytest.raises(ValueError):
        node_ports_xml(["10.0.0.1"], [0])


def test_the_guest_filter_is_clean_traffic_and_the_node_ports() -> None:
    root = ET.fromstring(guest_filter_xml())
    assert [ref.get("filter") for ref in root.iter("filterref")] == [
        "clean-traffic",
        "formation-vmm-node-ports",
    ]
    assert root.find("uuid") is None


def test_a_listener_on_every_address_names_none() -> None:
    assert listen_address("192.0.2.7") == "192.0.2.7"
    assert listen_address("0.0.0.0") is None  # the networks' gateways still are covered
    assert listen_address("::") is None and listen_address("node-a") is None
    assert listen_address("[::1]") is None  # IPv6: clean-traffic lets none out of a guest
