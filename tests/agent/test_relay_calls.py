"""Issue 26, finding 4: the migration relay gives a source node one domain's migration, not the
target's whole libvirtd. A compromised source agent, holding its node's relay key and a
migration under way, opens libvirt connections through the relay to a real libvirtd: it may read
the migrating domain (what a migration needs), and any other call (another domain, a
definition, a listing) cuts its connection before libvirtd sees it.

Real libvirtd (the tests' QEMU node), real relays with real TLS in this process; the
VmMigration check is the test's function (the apiserver's part: tests/agent/test_relay_access.py
and the real migrations of tests/migration/test_vm_migration.py, which run through this judge)."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from formation_vmm.agent.migration.migration_calls import MigrationCalls
from formation_vmm.agent.migration.relay import Identity, Relay, Stream, session_name
from formation_vmm.devcluster.libvirt_node import LibvirtNode

pytestmark = pytest.mark.libvirt

UID = "5d0c2a51-7a4e-4c1b-9f0e-2b6c8d9e0f1a"
STREAM = Stream("tenant", "move-web", UID, "libvirt")
MIGRATING, OTHER = "tenant_web", "other_db"


def domain_xml(name: str) -> str:
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory>"
        "<os><type arch='x86_64'>hvm</type></os></domain>"
    )


@pytest.fixture
def route_uri(tmp_path: Path, qemu_node: LibvirtNode) -> Iterator[str]:
    """A libvirt URI that reaches the QEMU node's libvirtd through a source and a target relay,
    the target judging every call for the migration of ``MIGRATING``."""
    direct = libvirt.open(qemu_node.uri)
    for name in (MIGRATING, OTHER):
        direct.defineXML(domain_xml(name))
    ids = {n: Identity.load_or_create(tmp_path / n / "state", n) for n in ("src", "tgt")}
    published = {n: i.certificate for n, i in ids.items()}

    def relay(node: str, calls: MigrationCalls | None) -> Relay:
        return Relay(
            node, ids[node], ("127.0.0.1", 0), tmp_path / node / "seen", tmp_path / node / "relay",
            qemu_node.socket, lambda *_: None, published.get,
            calls=(lambda _stream: calls) if calls is not None else None,
        )  # fmt: skip

    own = MigrationCalls(MIGRATING, lambda: direct.lookupByName(MIGRATING).XMLDesc(0))
    source, target = relay("src", None), relay("tgt", own)
    source.start()
    target.start()
    try:
        with source.outgoing(STREAM, f"127.0.0.1:{target.port}", published["tgt"]):
            yield f"qemu+unix:///system?socket={tmp_path / 'src' / 'relay' / session_name(UID) / 'l.sock'}"
    finally:
        source.stop()
        target.stop()
        for name in (MIGRATING, OTHER, "planted"):
            with contextlib.suppress(libvirt.libvirtError):
                direct.lookupByName(name).undefine()
        direct.close()


def test_the_migrating_domain_can_be_read_through_the_relay(route_uri: str) -> None:
    conn = libvirt.open(route_uri)
    try:
        assert f"<name>{MIGRATING}</name>" in conn.lookupByName(MIGRATING).XMLDesc(0)
        assert conn.lookupByName(MIGRATING).isActive() == 0
    finally:
        conn.close()


@pytest.mark.parametrize(
    "attempt",
    [
        lambda conn: conn.lookupByName(OTHER).XMLDesc(0),
        lambda conn: conn.defineXML(domain_xml("planted")),
        lambda conn: conn.listAllDomains(),
    ],
    ids=["another-domain", "a-new-definition", "a-listing"],
)
def test_any_other_call_cuts_the_connection(route_uri: str, qemu_node: LibvirtNode, attempt: object) -> None:
    conn = libvirt.open(route_uri)
    with pytest.raises(libvirt.libvirtError):
        attempt(conn)  # type: ignore[operator]
    with pytest.raises(libvirt.libvirtError):
        conn.lookupByName(MIGRATING)  # the connection is gone, not only the call
    direct = libvirt.open(qemu_node.uri)
    try:
        assert "planted" not in direct.listDefinedDomains()
    finally:
        direct.close()
