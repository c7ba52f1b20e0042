"""What the migration relay lets a source ask of the target's libvirtd (agent/migration/migration_calls.py),
packet by packet: pure, on packets built as libvirt's client builds them. The same judge against
a real libvirtd behind a real relay is in tests/agent/test_relay_calls.py; real migrations
through it in tests/migration/test_vm_migration.py."""

import pytest

from formation_vmm.agent.migration.libvirt_rpc import (
    CALL,
    KEEPALIVE_PROGRAM,
    MESSAGE,
    REMOTE_PROGRAM,
    REPLY,
    Packet,
    XdrReader,
    decode,
    read_typed_params,
    string_param,
    write_typed_params,
    xdr_opaque,
    xdr_string,
    xdr_uint,
)
from formation_vmm.agent.migration.migration_calls import (
    DOMAIN_GET_XML_DESC,
    DOMAIN_LOOKUP_BY_NAME,
    MIGRATE_FINISH3_PARAMS,
    MIGRATE_PREPARE3_PARAMS,
    CallRefusedError,
    MigrationCalls,
)

pytestmark = pytest.mark.pure

OWN = "<domain type='qemu'><name>tenant_web</name><!-- the target's own paths --></domain>"
DOMAIN_DEFINE_XML = 11
DOMAIN_UNDEFINE = 35


def call(procedure: int, body: bytes = b"", program: int = REMOTE_PROGRAM, kind: int = CALL) -> Packet:
    return Packet(program, 1, procedure, kind, 7, 0, body)


def judge() -> MigrationCalls:
    return MigrationCalls("tenant_web", lambda: OWN)


def on_domain(name: str) -> bytes:
    """remote_nonnull_domain: name, UUID (16 bytes), id; then the call's flags."""
    return xdr_string(name) + b"\x11" * 16 + xdr_uint(0xFFFFFFFF) + xdr_uint(8)


def test_a_packet_survives_its_encoding() -> None:
    packet = call(DOMAIN_LOOKUP_BY_NAME, xdr_string("tenant_web"))
    data = packet.encode()
    assert int.from_bytes(data[:4], "big") == len(data)
    assert decode(data[4:]) == packet


def test_the_migrating_domain_may_be_looked_up_and_read_and_no_other() -> None:
    guard = judge()
    for packet in (
        call(DOMAIN_LOOKUP_BY_NAME, xdr_string("tenant_web")),
        call(DOMAIN_GET_XML_DESC, on_domain("tenant_web")),
    ):
        assert guard(packet) is packet
    with pytest.raises(CallRefusedError, match="other_db"):
        guard(call(DOMAIN_LOOKUP_BY_NAME, xdr_string("other_db")))
    with pytest.raises(CallRefusedError, match="other_db"):
        guard(call(DOMAIN_GET_XML_DESC, on_domain("other_db")))


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (call(DOMAIN_DEFINE_XML, xdr_string(OWN)), "procedure 11"),
        (call(DOMAIN_UNDEFINE, on_domain("tenant_web")), "procedure 35"),
        (call(1, program=0x20008087), "not libvirt's remote program"),
        (call(DOMAIN_LOOKUP_BY_NAME, xdr_string("tenant_web"), kind=REPLY), "type 1"),
    ],
)
def test_anything_a_migration_does_not_send_is_refused(packet: Packet, why: str) -> None:
    with pytest.raises(CallRefusedError, match=why):
        judge()(packet)


def test_keepalives_pass() -> None:
    ping = call(1, program=KEEPALIVE_PROGRAM, kind=MESSAGE)
    assert judge()(ping) is ping


def migrate_body(params: list[tuple[str, int, bytes | str]], cookie: bytes = b"cookie") -> bytes:
    return write_typed_params(params) + xdr_opaque(cookie) + xdr_uint(0x5A)


@pytest.mark.parametrize("procedure", [MIGRATE_PREPARE3_PARAMS, MIGRATE_FINISH3_PARAMS])
def test_the_targets_own_definition_replaces_what_the_source_sent(procedure: int) -> None:
    evil = (
        "<domain type='qemu'><name>tenant_web</name>"
        "<devices><disk><source file='/etc/shadow'/></disk></devices></domain>"
    )
    bandwidth = ("bandwidth", 4, (64).to_bytes(8, "big"))
    sent = migrate_body(
        [string_param("destination_xml", evil), string_param("persistent_xml", evil), bandwidth]
    )
    out = XdrReader(judge()(call(procedure, sent)).body)
    params = {field: value for field, _, value in read_typed_params(out)}
    assert params == {"destination_xml": OWN, "persistent_xml": OWN, "bandwidth": (64).to_bytes(8, "big")}
    assert out.opaque() == b"cookie" and out.u32() == 0x5A  # the rest as sent


def test_a_prepare_without_an_xml_gets_the_targets_and_another_name_is_refused() -> None:
    out = XdrReader(judge()(call(MIGRATE_PREPARE3_PARAMS, migrate_body([]))).body)
    assert read_typed_params(out) == [string_param("destination_xml", OWN)]
    renamed = migrate_body([string_param("destination_name", "other_db")])
    with pytest.raises(CallRefusedError, match="other_db"):
        judge()(call(MIGRATE_PREPARE3_PARAMS, renamed))


def test_no_definition_here_refuses_the_migration() -> None:
    def missing() -> str:
        raise RuntimeError("no domain tenant_web")

    with pytest.raises(CallRefusedError, match="no definition"):
        MigrationCalls("tenant_web", missing)(call(MIGRATE_PREPARE3_PARAMS, migrate_body([])))
