"""What a source node may ask of this node's libvirtd through the migration relay (issue 26,
finding 4): the calls a peer-to-peer migration of one domain makes, for that domain alone, with
the definition this node's agent made for it. Pure.

The relay used to splice the source to the whole libvirtd socket: a compromised source agent
could define, start or read any domain here. Now each packet from the source is judged before it
reaches libvirtd (agent/migration/relay.py): libvirt's keepalives pass; of the remote program, only the
calls below, each checked, and anything else cuts the connection. The list is what libvirt's
source side and our source agent (agent/hypervisor/migration.py: the target's definition, where
the guest runs, the finished job's figures) send, read off the wire of a real migration.

The migration's Prepare and Finish carry the domain XML the target should run. Whatever the
source sends there, the target's own definition of the incoming VM replaces it (its paths, its
seed, its name and UUID), so the source chooses nothing of what runs here."""

from collections.abc import Callable

from formation_vmm.agent.migration.libvirt_rpc import (
    CALL,
    KEEPALIVE_PROGRAM,
    REMOTE_PROGRAM,
    Packet,
    RpcError,
    XdrReader,
    read_typed_params,
    string_param,
    write_typed_params,
)

CONNECT_OPEN = 1
DOMAIN_LOOKUP_BY_NAME = 23
DOMAIN_GET_XML_DESC = 14
DOMAIN_IS_ACTIVE = 150
DOMAIN_GET_JOB_STATS = 298
MIGRATE_PREPARE3_PARAMS = 303
MIGRATE_FINISH3_PARAMS = 306
ALLOWED = {
    CONNECT_OPEN: "open the connection",
    2: "close the connection",
    60: "ask which features the daemon supports",
    66: "list the authentication methods",
    360: "register for the connection's close",
    361: "unregister from the connection's close",
    DOMAIN_LOOKUP_BY_NAME: "look up the domain by name",
    DOMAIN_GET_XML_DESC: "read the domain's definition",
    DOMAIN_IS_ACTIVE: "ask whether the domain runs",
    DOMAIN_GET_JOB_STATS: "read the domain's job figures",
    MIGRATE_PREPARE3_PARAMS: "prepare the incoming migration",
    MIGRATE_FINISH3_PARAMS: "finish the incoming migration",
}
# Calls whose first argument is the domain: its name alone, or a remote_nonnull_domain (name,
# UUID, id), whose name libvirtd looks it up by.
BY_NAME = {DOMAIN_LOOKUP_BY_NAME}
ON_DOMAIN = {DOMAIN_GET_XML_DESC, DOMAIN_IS_ACTIVE, DOMAIN_GET_JOB_STATS}
MIGRATE = {MIGRATE_PREPARE3_PARAMS, MIGRATE_FINISH3_PARAMS}
# VIR_MIGRATE_PARAM_DEST_XML, _PERSIST_XML, _DEST_NAME.
DEST_XML, PERSIST_XML, DEST_NAME = "destination_xml", "persistent_xml", "destination_name"


class CallRefusedError(RpcError):
    """A call the relay does not carry; the connection is cut."""


class MigrationCalls:
    """Judges the packets a source sends for the migration of ``domain``; ``own_xml`` reads this
    node's definition of it (called in Prepare and Finish only)."""

    def __init__(self, domain: str, own_xml: Callable[[], str]) -> None:
        self.domain = domain
        self.own_xml = own_xml

    def __call__(self, packet: Packet) -> Packet:
        if packet.program == KEEPALIVE_PROGRAM:
            return packet
        if packet.program != REMOTE_PROGRAM:
            raise CallRefusedError(f"program {packet.program:#x} is not libvirt's remote program")
        if packet.type != CALL:
            raise CallRefusedError(f"a packet of type {packet.type} (a migration's source sends calls only)")
        if packet.procedure not in ALLOWED:
            raise CallRefusedError(f"procedure {packet.procedure} is not one a migration makes")
        if packet.procedure in BY_NAME | ON_DOMAIN:
            self._same_domain(XdrReader(packet.body).string())
        if packet.procedure in MIGRATE:
            return packet.with_body(self._own_definition(packet.body))
        return packet

    def _same_domain(self, name: str) -> None:
        if name != self.domain:
            raise CallRefusedError(f"domain {name[:100]!r} is not the migrating domain {self.domain}")

    def _own_definition(self, body: bytes) -> bytes:
        """The call's parameters with this node's definition for the domain's XML; the rest
        (cookie, flags, ...) as sent."""
        xdr = XdrReader(body)
        params = read_typed_params(xdr)
        rest = xdr.rest()
        for field, _, value in params:
            if field == DEST_NAME:
                self._same_domain(str(value))
        try:
            own = self.own_xml()
        except Exception as exc:  # no incoming definition here: nothing to migrate into
            raise CallRefusedError(f"this node has no definition of {self.domain}: {exc}") from exc
        kept = [p for p in params if p[0] not in (DEST_XML, PERSIST_XML)]
        sent = {p[0] for p in params}
        replaced = [string_param(DEST_XML, own)]
        if PERSIST_XML in sent:
            replaced.append(string_param(PERSIST_XML, own))
        return write_typed_params(replaced + kept) + rest
