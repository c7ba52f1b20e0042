"""A real QEMU node for the tests: its own libvirtd and virtlogd in a private mount namespace
(``devcluster.libvirt_node``), so the tests never touch this machine's own libvirtd, nor a dev
cluster's, nor another test run's; and in a network namespace of its own, so the VM networks
it makes (bridges, NAT rules, dnsmasq) and every packet of its guests stay off the host's."""

from collections.abc import Iterator

import pytest

from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.processes import ProcessTable


@pytest.fixture(scope="session")
def qemu_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtNode]:
    root = tmp_path_factory.mktemp("qemu-node")
    table = ProcessTable(root / "pids.json")
    node = LibvirtNode(root / "libvirt", "qemu-node", table, network_namespace=True)
    node.start()
    try:
        yield node
    finally:
        node.stop()
