"""Issue 26, finding 7 (the guests' part): a guest cannot reach the node's own ports. The agent's
nwfilter drops guest TCP to the addresses where it listens and to each VmNetwork's gateway (the
node's address on the guests' bridge), on the agent's ports; any other port of the node stays
reachable (the test proves its path works).

Real QEMU guest on node-q, whose libvirtd, bridges and nwfilter rules live in the network
namespace the tests made. node-q's agent itself listens on the host's loopback, which no guest
can reach anyway: so the test listens in the node's namespace, on the gateway, on the agent's
port number (what a guest would find there if the agent listened on every address) and on
another, and the guest tries both."""

import ipaddress
import json
import subprocess
from pathlib import Path

import pytest

from formation_vmm.devcluster.processes import free_port
from tests.controlplane.test_real_network import console_lines, guest, guest_files, images  # noqa: F401
from tests.support.fleet import QEMU_NODE, Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

FETCHED = "formation-vmm guest: fetched"


def test_a_guest_cannot_reach_the_agents_port_on_the_node(
    fleet: Fleet,
    ns: str,
    guest_files: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    network = json.loads(fleet.kubectl("get", "vmnetwork", "default", "-o", "json"))
    gateway = str(ipaddress.IPv4Network(network["spec"]["subnet"], strict=False).network_address + 1)
    agent = fleet.agents[QEMU_NODE]
    guarded, access, other = agent.port, int(agent.env["VMM_ACCESS_PORT"]), free_port()
    (tmp_path / "index.html").write_text("hello from the node\n")
    servers = [
        subprocess.Popen(
            fleet.qemu.in_netns(
                "python3", "-m", "http.server", "--bind", gateway, "--directory", str(tmp_path), str(port)
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in (guarded, access, other)
    ]
    try:
        images(fleet, ns, guest_files)
        guest(fleet, ns, "prober", f"vmm.fetch={gateway}:{other},{gateway}:{guarded},{gateway}:{access}")

        # Three rounds of the three tries on the console.
        wait_for(lambda: len(console_lines(fleet, ns, "prober", FETCHED)) >= 9, 150, "the guest's tries")
        seen: dict[str, set[str]] = {}
        for line in console_lines(fleet, ns, "prober", FETCHED):
            target, _, outcome = line.partition(" ")
            seen.setdefault(target, set()).add(outcome.split(":")[0])
        assert seen[f"{gateway}:{other}"] == {"ok"}, seen  # the node answers the guest...
        assert seen[f"{gateway}:{guarded}"] == {"failed"}, seen  # ...except on the agent's ports
        assert seen[f"{gateway}:{access}"] == {"failed"}, seen
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)
