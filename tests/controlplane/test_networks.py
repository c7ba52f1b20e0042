"""VmNetworks across the fleet: realised on every node (node-q on a real libvirtd, in a network
namespace of its own, so its bridges and dnsmasq are real), addresses assigned at placement and
handed out by DHCP as static entries, refusals of networks a VM may not use, IPAM under a burst
and across a controller restart."""

import ipaddress
import uuid
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from formation_vmm.api.names import bridge_device
from tests.support.fleet import QEMU_NODE, TEST_NODES, TINY, Fleet, condition
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane

ALL_NODES = [*TEST_NODES, QEMU_NODE]


def network(fleet: Fleet, name: str) -> dict[str, Any]:
    return get_json(fleet.kubectl, "vmnetwork", name)


def node_entry(fleet: Fleet, name: str, node: str) -> dict[str, Any]:
    return next((n for n in network(fleet, name).get("status", {}).get("nodes", []) if n["name"] == node), {})


def libvirt_network(fleet: Fleet, node: str, name: str) -> dict[str, Any] | None:
    found: dict[str, Any] = fleet.agent_get(node, "/networks")
    return found.get(f"vmm-{name}")


def dhcp_hosts(xml: str) -> dict[str, str]:
    return {h.get("mac", ""): h.get("ip", "") for h in ET.fromstring(xml).iterfind("./ip/dhcp/host")}


def interface(vm: dict[str, Any], name: str = "eth0") -> dict[str, Any]:
    return next((i for i in vm.get("status", {}).get("interfaces", []) if i["name"] == name), {})


def test_the_default_network_runs_on_every_node_and_says_so(fleet: Fleet) -> None:
    wait_for(
        lambda: network(fleet, "default").get("status", {}).get("nodesReady") == "3/3", 60, "default ready"
    )
    for node in ALL_NODES:
        assert node_entry(fleet, "default", node) == {
            "name": node,
            "phase": "Ready",
            "bridge": bridge_device("default"),
        }
        made = libvirt_network(fleet, node, "default")
        assert made is not None and made["active"] and made["autostart"]
    columns = fleet.kubectl("get", "vmnet", "default").splitlines()
    assert columns[0].split() == ["NAME", "MODE", "SUBNET", "NODES", "READY", "AGE"]
    assert columns[1].split()[:4] == ["default", "nat", "10.123.0.0/16", "3/3"]
    # On the real node the bridge exists, inside the node's network namespace, with the gateway.
    out = fleet.qemu_netns("ip", "-4", "-o", "addr", "show", "dev", bridge_device("default"))
    assert "10.123.0.1/16" in out


def test_a_vm_shows_its_address_from_placement_and_dhcp_hands_out_exactly_it(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "web", networks=[{"name": "eth0"}], nodeSelector={"zone": "a"}, **TINY)
    placed = fleet.wait_vm(ns, "web", lambda v: bool(interface(v).get("ipAddress")), "an address")
    eth0 = interface(placed)
    assert eth0["infoSource"] == "ipam" and eth0["network"] == "default"
    assert ipaddress.ip_address(eth0["ipAddress"]) in ipaddress.ip_network("10.123.0.0/16")
    vm = fleet.wait_phase(ns, "web", "Running")
    assert interface(vm)["ipAddress"] == eth0["ipAddress"] and interface(vm)["mac"] == eth0["mac"]
    assert condition(vm, "AddressesMatch")["status"] == "True"
    row = fleet.kubectl("get", "vm", "web", "-n", ns).splitlines()[1].split()
    assert row[3] == eth0["ipAddress"]  # the IP column
    made = libvirt_network(fleet, "node-a", "default")
    assert made is not None and dhcp_hosts(made["xml"]).get(eth0["mac"]) == eth0["ipAddress"]
    # Stopped and started: the same MAC and address.
    assert fleet.plugin("-n", ns, "stop", "web").returncode == 0
    assert fleet.plugin("-n", ns, "start", "web").returncode == 0
    again = fleet.vm(ns, "web")
    assert (interface(again)["mac"], interface(again)["ipAddress"]) == (eth0["mac"], eth0["ipAddress"])
    # Deleted: its DHCP entry goes with its domain.
    fleet.kubectl("delete", "vm", "web", "-n", ns)

    def entry_gone() -> bool:
        made = libvirt_network(fleet, "node-a", "default")
        return made is not None and eth0["mac"] not in dhcp_hosts(made["xml"])

    wait_for(entry_gone, 30, "the DHCP entry removed")


def test_unknown_and_not_allowed_networks_are_refused_until_allowed(
    fleet: Fleet, ns: str, make_network: Any
) -> None:
    fleet.apply_vm(ns, "lost", networks=[{"name": "eth0", "network": "no-such-net"}], **TINY)
    vm = fleet.wait_vm(
        ns, "lost", lambda v: condition(v, "Scheduled").get("reason") == "NetworkNotFound", "refused"
    )
    assert vm["status"]["phase"] == "Pending"
    assert (
        "names network 'no-such-net', and there is no VmNetwork of that name"
        in condition(vm, "Scheduled")["message"]
    )

    key = f"vmm-test-{uuid.uuid4().hex[:6]}"
    private = make_network("10.124.1.0/24", namespaceSelector={"matchLabels": {key: "yes"}})
    fleet.apply_vm(ns, "guarded", networks=[{"name": "eth0", "network": private}], **TINY)
    vm = fleet.wait_vm(
        ns, "guarded", lambda v: condition(v, "Scheduled").get("reason") == "NetworkNotAllowed", "refused"
    )
    assert f"which namespace '{ns}' may not use" in condition(vm, "Scheduled")["message"]
    events = fleet.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=guarded")
    assert "NetworkNotAllowed" in events
    fleet.kubectl("label", "namespace", ns, f"{key}=yes")
    vm = fleet.wait_phase(ns, "guarded", "Running", 60)
    assert ipaddress.ip_address(interface(vm)["ipAddress"]) in ipaddress.ip_network("10.124.1.0/24")


def test_ipam_under_a_burst_and_a_controller_restart_never_gives_an_address_twice(
    fleet: Fleet, ns: str, make_network: Any
) -> None:
    small = make_network("10.124.2.0/29")  # .2 to .6: 5 addresses (and 6 VMs fit node-a and node-b)
    for i in range(5):
        fleet.apply_vm(ns, f"b{i}", networks=[{"name": "eth0", "network": small}], cpus=1, memory="16Mi")
    vms = [
        fleet.wait_vm(ns, f"b{i}", lambda v: bool(interface(v).get("ipAddress")), "addressed")
        for i in range(5)
    ]
    addresses = [interface(v)["ipAddress"] for v in vms]
    assert sorted(addresses) == [f"10.124.2.{i}" for i in range(2, 7)]

    fleet.apply_vm(ns, "late", networks=[{"name": "eth0", "network": small}], cpus=1, memory="16Mi")
    vm = fleet.wait_vm(
        ns, "late", lambda v: condition(v, "Scheduled").get("reason") == "AddressesExhausted", "full"
    )
    assert f"network '{small}' has no free address left" in condition(vm, "Scheduled")["message"]

    # A restarted controller learns every assignment back before it binds anything.
    fleet.controller.kill()
    fleet.controller.restart(fleet.plane)
    fleet.controller.wait_ready()
    freed = interface(fleet.vm(ns, "b3"))["ipAddress"]
    fleet.kubectl("delete", "vm", "b3", "-n", ns, "--wait=true")
    vm = fleet.wait_vm(ns, "late", lambda v: bool(interface(v).get("ipAddress")), "addressed", 60)
    assert interface(vm)["ipAddress"] == freed
    held = [interface(fleet.vm(ns, f"b{i}"))["ipAddress"] for i in range(5) if i != 3]
    assert freed not in held and len(set(held)) == 4


def test_a_network_that_clashes_on_a_node_fails_there_with_the_reason(
    fleet: Fleet, make_network: Any
) -> None:
    # The default network's subnet again: the real libvirtd of node-q refuses it, as the route
    # is taken (libvirt's test driver on node-a and node-b checks nothing, so there it runs).
    clash = make_network("10.123.0.0/16")
    wait_for(lambda: node_entry(fleet, clash, QEMU_NODE).get("phase") == "Failed", 60, "failed on node-q")
    entry = node_entry(fleet, clash, QEMU_NODE)
    assert entry["reason"] == "AddressInUse", entry
    assert "in use" in entry["message"]
    wait_for(lambda: network(fleet, clash).get("status", {}).get("nodesReady") == "2/3", 30, "2/3")


def test_a_deleted_network_stays_on_a_node_while_a_vm_uses_it(
    fleet: Fleet, ns: str, make_network: Any
) -> None:
    name = make_network("10.124.3.0/24")
    fleet.apply_vm(
        ns, "user", networks=[{"name": "eth0", "network": name}], nodeSelector={"zone": "b"}, **TINY
    )
    fleet.wait_phase(ns, "user", "Running")
    fleet.kubectl("delete", "vmnetwork", name)
    wait_for(lambda: libvirt_network(fleet, "node-a", name) is None, 30, "removed where unused")
    assert libvirt_network(fleet, "node-b", name) is not None  # its VM still runs there
    fleet.kubectl("delete", "vm", "user", "-n", ns, "--wait=true")
    wait_for(lambda: libvirt_network(fleet, "node-b", name) is None, 30, "removed once unused")


def test_a_bridge_network_whose_bridge_is_missing_fails_there_with_the_reason(
    fleet: Fleet, make_network: Any
) -> None:
    lan = make_network("", mode="bridge", bridge="vmmnobr0")  # no such bridge in node-q's namespace
    wait_for(lambda: node_entry(fleet, lan, QEMU_NODE).get("phase") == "Failed", 60, "failed on node-q")
    entry = node_entry(fleet, lan, QEMU_NODE)
    assert entry["reason"] == "BridgeMissing", entry
    assert "vmmnobr0" in entry["message"]
