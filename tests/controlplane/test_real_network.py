"""Real guests on real VmNetworks: node-q's libvirtd runs in a network namespace the tests made
(tests/support/nodes.py), so its bridges, dnsmasq, NAT and nwfilter rules, every guest packet
and the agent's probes stay inside it. The guest is Debian's cloud kernel with the busybox
initramfs of devcluster/guest.py: udhcpc for the address, httpd to answer, wget to reach out."""

import hashlib
import ipaddress
import subprocess
from typing import Any

import pytest
import yaml

from formation_vmm.api.names import GROUP, VERSION
from formation_vmm.devcluster.guest import ADDRESS, FETCHED, GUEST_AGENT, HTTPD_STOPPED, install
from tests.support.fleet import ON_QEMU, QEMU_NODE, Fleet, condition
from tests.support.networks import MakeNetwork
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def guest_files(fleet: Fleet) -> dict[str, str]:
    files = install(fleet.images_dir(QEMU_NODE), "netguest")
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def images(fleet: Fleet, namespace: str, files: dict[str, str]) -> None:
    for name, path, sha in (
        ("kernel", "netguest/vmlinuz", files["vmlinuz"]),
        ("initrd", "netguest/initrd.gz", files["initrd.gz"]),
    ):
        doc = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VmImage",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": {"hostPath": {"path": path}}, "checksum": f"sha256:{sha}"},
        }
        fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))


def guest(fleet: Fleet, ns: str, name: str, cmdline: str, network: str = "default", **extra: Any) -> None:
    fleet.apply_vm(
        ns,
        name,
        **{
            **ON_QEMU,
            "memory": "128Mi",
            "kernel": {
                "image": "kernel",
                "initrd": "initrd",
                "cmdline": f"console=ttyS0 panic=-1 vmm.net=1 {cmdline}",
            },
            "networks": [{"name": "eth0", "network": network}],
            **extra,
        },
    )


def address(fleet: Fleet, ns: str, name: str) -> str:
    vm = fleet.wait_vm(
        ns, name, lambda v: v.get("status", {}).get("interfaces", [{}])[0].get("ipAddress"), "address"
    )
    return str(vm["status"]["interfaces"][0]["ipAddress"])


def console_lines(fleet: Fleet, ns: str, name: str, marker: str) -> list[str]:
    lines = fleet.console(ns, name).replace("\r", "").splitlines()
    return [line[len(marker) :].strip() for line in lines if line.startswith(marker)]


def test_guests_get_their_assigned_addresses_by_dhcp_reach_each_other_and_turn_ready(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    images(fleet, ns, guest_files)
    probe = {"httpGet": {"port": 80, "path": "/index.html"}, "periodSeconds": 1, "failureThreshold": 1}
    guest(fleet, ns, "a", "", readinessProbe=probe)
    a_ip = address(fleet, ns, "a")  # known from placement, before the guest boots
    guest(fleet, ns, "b", f"vmm.fetch={a_ip}")
    b_ip = address(fleet, ns, "b")
    assert a_ip != b_ip and all(
        ipaddress.ip_address(ip) in ipaddress.ip_network("10.123.0.0/16") for ip in (a_ip, b_ip)
    )

    # DHCP handed each guest exactly its assigned address.
    assert wait_for(lambda: console_lines(fleet, ns, "a", ADDRESS), 90, "a's address") == [f"{a_ip}/16"]
    assert wait_for(lambda: console_lines(fleet, ns, "b", ADDRESS), 90, "b's address") == [f"{b_ip}/16"]
    # b reaches a's HTTP server across the network.
    got = wait_for(
        lambda: [x for x in console_lines(fleet, ns, "b", FETCHED) if "ok" in x], 60, "b fetched a"
    )
    assert got[0].startswith(f"{a_ip} ok: hello from ")
    # The readiness probe ran from the node (in its namespace) against a's address.
    vm = fleet.wait_vm(ns, "a", lambda v: condition(v, "Ready").get("status") == "True", "Ready", 60)
    assert vm["status"]["phase"] == "Running"
    assert condition(vm, "Ready")["reason"] == "ReadinessProbeSucceeded"
    assert condition(vm, "AddressesMatch")["status"] == "True"
    # The lease confirms the assignment (dnsmasq's leases, read through libvirt).
    fleet.wait_vm(
        ns, "a", lambda v: "lease" in v["status"]["interfaces"][0].get("infoSource", ""), "lease seen", 30
    )
    # From the node's namespace (never the host's) the guest answers too.
    page = subprocess.run(
        fleet.qemu.in_netns("curl", "-s", "--max-time", "5", f"http://{a_ip}/index.html"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert page.stdout.startswith("hello from ")


def test_another_network_and_a_spoofed_address_get_nothing_through(
    fleet: Fleet, ns: str, guest_files: dict[str, str], make_network: MakeNetwork
) -> None:
    # node-q takes two 1-vCPU guests at a time: the server, and one client after another.
    images(fleet, ns, guest_files)
    guest(fleet, ns, "server", "")
    server_ip = address(fleet, ns, "server")
    wait_for(lambda: console_lines(fleet, ns, "server", ADDRESS), 90, "server up")

    def fetches(name: str) -> list[str]:
        return wait_for(
            lambda: len(found := console_lines(fleet, ns, name, FETCHED)) >= 3 and found, 120, f"{name} tries"
        )

    # A well-behaved neighbour proves the path works...
    guest(fleet, ns, "neighbour", f"vmm.fetch={server_ip}")
    assert fetches("neighbour")[0].startswith(f"{server_ip} ok: hello from ")
    fleet.kubectl("delete", "vm", "neighbour", "-n", ns, "--wait=true")
    # ...a guest claiming an address of the network no VM holds gets nothing through (the
    # anti-spoofing filter drops its packets)...
    guest(fleet, ns, "spoofer", f"vmm.spoof=10.123.250.250/16 vmm.fetch={server_ip}")
    assert set(fetches("spoofer")) == {f"{server_ip} failed"}
    assert console_lines(fleet, ns, "spoofer", ADDRESS)[-1] == "10.123.250.250/16 (spoofed)"
    fleet.kubectl("delete", "vm", "spoofer", "-n", ns, "--wait=true")
    # ...nor one that keeps its address and changes its MAC...
    guest(fleet, ns, "macspoofer", f"vmm.spoofmac=52:54:00:de:ad:01 vmm.fetch={server_ip}")
    assert set(fetches("macspoofer")) == {f"{server_ip} failed"}
    assert console_lines(fleet, ns, "macspoofer", ADDRESS)[-1].endswith("(mac spoofed 52:54:00:de:ad:01)")
    fleet.kubectl("delete", "vm", "macspoofer", "-n", ns, "--wait=true")
    # ...nor does a guest on another network.
    other = make_network("10.124.9.0/24", mode="isolated")
    guest(fleet, ns, "outsider", f"vmm.fetch={server_ip}", network=other)
    assert set(fetches("outsider")) == {f"{server_ip} failed"}
    assert console_lines(fleet, ns, "outsider", ADDRESS)[0].startswith("10.124.9.")


def test_readiness_turns_off_when_the_guest_stops_answering_and_liveness_restarts_it(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    images(fleet, ns, guest_files)
    ready = {"httpGet": {"port": 80}, "periodSeconds": 1, "failureThreshold": 1}
    guest(fleet, ns, "flaky", "vmm.httpd_for=25", readinessProbe=ready)
    fleet.wait_vm(ns, "flaky", lambda v: condition(v, "Ready").get("status") == "True", "Ready", 90)
    vm = fleet.wait_vm(
        ns, "flaky", lambda v: condition(v, "Ready").get("reason") == "ReadinessProbeFailed", "not Ready", 60
    )
    assert vm["status"]["phase"] == "Running"  # ready once in this run: Running, not Starting
    assert "Connection refused" in condition(vm, "Ready")["message"]
    assert console_lines(fleet, ns, "flaky", HTTPD_STOPPED) == [""]

    alive = {
        "tcpSocket": {"port": 8080},
        "initialDelaySeconds": 10,
        "periodSeconds": 2,
        "failureThreshold": 2,
    }
    guest(fleet, ns, "dead", "", livenessProbe=alive)
    restarted = lambda v: v.get("status", {}).get("restartCount", 0) >= 1  # noqa: E731
    vm = fleet.wait_vm(ns, "dead", restarted, "restarted", 120)
    events = fleet.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=dead")
    assert "LivenessProbeFailed" in events
    assert "liveness probe tcpSocket :8080 failed 2 times" in events


def test_guest_agent_ping_and_the_agents_addresses(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    # The guest runs Debian's qemu-guest-agent (copied into its initramfs) on the virtio-serial
    # channel every domain has: the probe pings it through libvirt, and its view of the
    # interfaces confirms the assigned address (infoSource).
    images(fleet, ns, guest_files)
    ping = {"guestAgentPing": {}, "periodSeconds": 1, "failureThreshold": 1}
    guest(fleet, ns, "talker", "vmm.ga=1", readinessProbe=ping)
    vm = fleet.wait_vm(ns, "talker", lambda v: condition(v, "Ready").get("status") == "True", "Ready", 120)
    assert condition(vm, "Ready")["reason"] == "ReadinessProbeSucceeded"
    assert console_lines(fleet, ns, "talker", GUEST_AGENT)[0].startswith("on /dev/vport")
    vm = fleet.wait_vm(
        ns,
        "talker",
        lambda v: "guest-agent" in v["status"]["interfaces"][0].get("infoSource", ""),
        "agent",
        60,
    )
    assert vm["status"]["interfaces"][0]["infoSource"].startswith("ipam")
    assert condition(vm, "AddressesMatch")["status"] == "True"

    # Without the agent the probe fails with libvirt's reason, and the VM stays Starting.
    guest(fleet, ns, "mute", "", readinessProbe=ping)
    vm = fleet.wait_vm(
        ns, "mute", lambda v: condition(v, "Ready").get("reason") == "ReadinessProbeFailed", "failed", 120
    )
    assert vm["status"]["phase"] == "Starting"
    assert "the guest agent does not answer" in condition(vm, "Ready")["message"]
