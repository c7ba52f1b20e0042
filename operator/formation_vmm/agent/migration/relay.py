"""The migration relay: how a migration's three streams cross from one node to another over TLS
with both ends authenticated, while both libvirtds stay off the network (docs/migration.md).

libvirt's peer-to-peer migration makes three kinds of connection: the source's libvirtd to the
target's (RPC), the source QEMU's memory stream to the target QEMU, and one NBD connection per
disk to the target's NBD server. Each is a UNIX socket here, as in KubeVirt and Virtink: on the
source, this agent listens on ``<dir>/<migration>/{l,m,d}.sock`` and forwards every connection
to the target's agent over TLS; the target's agent connects it to its libvirtd's socket, or to
the socket the target QEMU listens on at the same path on its side.

Trust comes from the apiserver, not from a CA: each agent makes a key and a self-signed
certificate and publishes the certificate in its Node's migration endpoint annotation, which
only that node's agent may write (the agents' admission policy). Each side of a connection trusts
exactly the other node's published certificate. The target also checks that a VmMigration
asks for this very stream: it exists with that uid, it is under way, its target is this node and
its source the node that connected. Anyone else gets nothing, and never a libvirt socket.

The relay runs its own asyncio loop in a thread of its own; the migration worker opens and
closes outgoing sessions from its thread."""

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from formation_vmm import metrics, tls
from formation_vmm.agent.migration.libvirt_rpc import Packet, RpcError, read_packet

log = logging.getLogger(__name__)

T = TypeVar("T")

# The stream a connection carries, and the socket it has on either side.
SOCKETS = {"libvirt": "l.sock", "memory": "m.sock", "disks": "d.sock"}
HANDSHAKE_SECONDS = 10.0
# How often a stream carried to this node is asked for again: one whose migration ended, or
# ran past this node's own deadline for it, is cut, whatever the source keeps sending.
RECHECK_SECONDS = 5.0
CHUNK = 256 * 1024
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_UID = re.compile(r"^[0-9a-f-]{36}$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


class RelayError(RuntimeError):
    pass


@dataclass(frozen=True)
class Stream:
    """What a connection to a target's relay asks for."""

    namespace: str
    migration: str
    uid: str
    kind: str

    def valid(self) -> bool:
        return (
            bool(_NAME.match(self.namespace))
            and bool(_NAME.match(self.migration))
            and bool(_UID.match(self.uid))
            and self.kind in SOCKETS
        )


def session_name(migration_uid: str) -> str:
    """The directory of one migration's sockets: short, since a UNIX socket's path is."""
    return migration_uid.replace("-", "")[:12]


# --- this agent's identity ---------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    key_path: Path
    cert_path: Path
    certificate: str  # PEM, as published

    @staticmethod
    def load_or_create(directory: Path, node: str) -> "Identity":
        """The relay's key and self-signed certificate, kept in the agent's state directory so a
        restarted agent publishes the same one."""
        key_path, cert_path = directory / "relay-key.pem", directory / "relay-cert.pem"
        if not (key_path.exists() and cert_path.exists()):
            pair = tls.self_signed(node)
            written_cert, written_key = pair.write(directory, "relay-new")
            written_key.replace(key_path)
            written_cert.replace(cert_path)
        return Identity(key_path, cert_path, cert_path.read_text())

    def pair(self) -> tls.KeyPair:
        return tls.KeyPair(self.key_path.read_bytes(), self.certificate)

    def context(self, server: bool, peer_certificate: str) -> ssl.SSLContext:
        """TLS that trusts only ``peer_certificate`` and shows ours."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.load_verify_locations(cadata=peer_certificate)
        ctx.check_hostname = False  # the peer is pinned by its certificate, not by a name
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _peer_is(writer: asyncio.StreamWriter, pem: str) -> bool:
    obj = writer.get_extra_info("ssl_object")
    return obj is not None and tls.same_certificate(obj.getpeercert(binary_form=True), pem)


# --- the relay -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """How the source reaches the target through its relay session: the URI the source's
    libvirtd opens, the one this agent opens, and the QEMU streams' URIs."""

    libvirtd_uri: str
    agent_uri: str
    memory_uri: str
    disks_uri: str


def libvirt_uri(socket: Path) -> str:
    return f"qemu+unix:///system?socket={socket}"


def socket_owner(text: str | None) -> tuple[int, int] | None:
    """``uid:gid`` (the owner the relay gives its sockets, so the node's QEMU may use them)."""
    if not text:
        return None
    uid, _, gid = text.partition(":")
    return int(uid), int(gid)


# Who may ask this node for a stream: None, or why not.
Authorize = Callable[[str, Stream], "str | None"]
# The certificate a node publishes, or None.
Certificates = Callable[[str], "str | None"]


class Relay:
    def __init__(
        self,
        node: str,
        identity: Identity,
        listen: tuple[str, int],
        socket_dir: Path,
        host_dir: Path,
        libvirt_socket: Path,
        authorize: Authorize,
        certificates: Certificates,
        socket_owner: tuple[int, int] | None = None,
        calls: "Callable[[Stream], Callable[[Packet], Packet]] | None" = None,
    ) -> None:
        """``socket_dir``: where the sessions' sockets are as libvirtd and QEMU see them;
        ``host_dir``: the same directory as this agent sees it (they differ where libvirtd has
        a mount namespace of its own); ``libvirt_socket``: this node's libvirtd, for incoming
        RPC streams; ``socket_owner``: who the target QEMU runs as, if not root (it makes its
        sockets in the migration's directory); ``calls``: the judge of what a source may send
        to this node's libvirtd for an incoming stream (agent/migration/migration_calls.py), which raises
        RpcError to cut the connection."""
        self.node = node
        self.calls = calls
        self.socket_owner = socket_owner
        self.identity = identity
        self.listen = listen
        self.socket_dir = socket_dir
        self.host_dir = host_dir
        self.libvirt_socket = libvirt_socket
        self.authorize = authorize
        self.certificates = certificates
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="relay", daemon=True)
        self._server: asyncio.Server | None = None
        self.port = listen[1]

    # --- life cycle (from any thread) ---

    def start(self) -> None:
        self.host_dir.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._incoming, self.listen[0], self.listen[1]))
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("migration relay listening on %s:%d", self.listen[0], self.port)

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):  # a loop that is gone has nothing to close
                self._call(_close([self._server]))
        self._loop.call_soon_threadsafe(self._loop.stop)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    # --- the target's side ---

    def incoming(self, migration_uid: str, owner: tuple[int, int] | None = None) -> Path:
        """The directory the target QEMU's sockets go to for this migration (made here), its
        QEMU's: ``owner`` (the VM's own uid and gid), else the node's QEMU user."""
        path = self.host_dir / session_name(migration_uid)
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        owner = owner or self.socket_owner
        if owner is not None:
            # Only QEMU may make sockets there: a local user who could would be sent the guest's
            # memory by this relay.
            os.chown(path, *owner)
        return path

    def forget(self, migration_uid: str) -> None:
        shutil.rmtree(self.host_dir / session_name(migration_uid), ignore_errors=True)

    async def _incoming(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        asked: list[Stream] = []
        try:
            source, local = await asyncio.wait_for(self._accept(reader, writer, asked), HANDSHAKE_SECONDS)
        except (OSError, ValueError, ssl.SSLError, TimeoutError, RelayError) as exc:
            log.warning("migration relay: refused a connection from %s: %s", peer, exc)
            kind = asked[0].kind if asked and asked[0].kind in SOCKETS else "unknown"
            metrics.RELAY_STREAMS.labels("in", kind, "refused").inc()
            writer.close()
            return
        stream = asked[0]
        metrics.RELAY_STREAMS.labels("in", stream.kind, "relayed").inc()
        judge = self.calls(stream) if stream.kind == "libvirt" and self.calls is not None else None
        splice = asyncio.ensure_future(_splice(reader, writer, *local, a_to_b="in", judge=judge))
        recheck = asyncio.ensure_future(self._while_asked(source, stream))
        done, _ = await asyncio.wait({splice, recheck}, return_when=asyncio.FIRST_COMPLETED)
        if recheck in done:
            log.warning(
                "migration relay: cut %s of %s/%s from node %s: %s",
                stream.kind, stream.namespace, stream.migration, source, recheck.result(),
            )  # fmt: skip
            metrics.RELAY_STREAMS.labels("in", stream.kind, "cut").inc()
            for end in (writer, local[1]):
                end.close()
        else:
            recheck.cancel()
        with contextlib.suppress(Exception):
            await splice

    async def _while_asked(self, source: str, stream: Stream) -> str:
        """Returns (why) once the stream's migration no longer asks for it."""
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            try:
                problem = await asyncio.to_thread(self.authorize, source, stream)
            except Exception as exc:  # the API away a moment: asked again next time
                log.debug("migration relay: cannot check %s again: %s", stream.migration, exc)
                continue
            if problem is not None:
                return problem

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, asked: list[Stream]
    ) -> tuple[str, tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        """The source names its node in the clear; TLS then holds it to that node's published
        certificate; inside, the stream it wants, checked against the VmMigration. Returns the
        source node and the local connection its stream goes to."""
        source = (await reader.readline()).decode("ascii", "replace").strip()
        if not _NODE_NAME.match(source) or source == self.node:
            raise RelayError(f"not a node name: {source[:80]!r}")
        certificate = await asyncio.to_thread(self.certificates, source)
        if certificate is None:
            raise RelayError(f"node {source} publishes no relay certificate")
        writer.write(b"go\n")
        await writer.drain()
        await writer.start_tls(self.identity.context(True, certificate))
        if not _peer_is(writer, certificate):
            raise RelayError(f"the peer is not node {source}")
        request = json.loads(await reader.readline())
        if not isinstance(request, dict):
            raise RelayError("malformed request")
        stream = Stream(
            str(request.get("namespace", "")),
            str(request.get("migration", "")),
            str(request.get("uid", "")),
            str(request.get("stream", "")),
        )
        asked.append(stream)
        problem = (
            "malformed request"
            if not stream.valid()
            else await asyncio.to_thread(self.authorize, source, stream)
        )
        if problem is not None:
            writer.write(f"refused: {problem}\n".encode())
            await writer.drain()
            raise RelayError(
                f"node {source} asked for {stream.kind} of {stream.namespace}/{stream.migration}: {problem}"
            )
        path = (
            self.libvirt_socket
            if stream.kind == "libvirt"
            else self.host_dir / session_name(stream.uid) / SOCKETS[stream.kind]
        )
        local = await asyncio.open_unix_connection(str(path))
        writer.write(b"ok\n")
        await writer.drain()
        return source, local

    # --- the source's side ---

    @contextlib.contextmanager
    def outgoing(
        self, stream: Stream, address: str, certificate: str, owner: tuple[int, int] | None = None
    ) -> Iterator[Route]:
        """Listen on this migration's sockets for as long as the caller needs the target; every
        connection made to them goes to the target's relay at ``address``. The source QEMU's
        sockets are ``owner``'s (the VM's own uid and gid), else the node's QEMU user's."""
        owner = owner or self.socket_owner
        name = session_name(stream.uid)
        directory = self.host_dir / name
        directory.mkdir(parents=True, exist_ok=True, mode=0o711)
        servers = []
        try:
            for kind, socket in SOCKETS.items():
                wanted = Stream(stream.namespace, stream.migration, stream.uid, kind)

                async def serve(
                    r: asyncio.StreamReader, w: asyncio.StreamWriter, wanted: Stream = wanted
                ) -> None:
                    await self._forward(wanted, address, certificate, r, w)

                servers.append(self._call(asyncio.start_unix_server(serve, str(directory / socket))))
                # libvirtd (root) dials the RPC socket, the source QEMU the others: nobody else.
                os.chmod(directory / socket, 0o600)
                if owner is not None and kind != "libvirt":
                    os.chown(directory / socket, *owner)
            seen = self.socket_dir / name
            yield Route(
                libvirtd_uri=libvirt_uri(seen / SOCKETS["libvirt"]),
                agent_uri=libvirt_uri(directory / SOCKETS["libvirt"]),
                memory_uri=f"unix://{seen / SOCKETS['memory']}",
                disks_uri=f"unix://{seen / SOCKETS['disks']}",
            )
        finally:
            self._call(_close(servers))  # on the relay's loop: asyncio servers are not thread-safe
            shutil.rmtree(directory, ignore_errors=True)

    async def _forward(
        self,
        stream: Stream,
        address: str,
        certificate: str,
        local_reader: asyncio.StreamReader,
        local_writer: asyncio.StreamWriter,
    ) -> None:
        try:
            remote = await asyncio.wait_for(self._dial(stream, address, certificate), HANDSHAKE_SECONDS)
        except RelayError as exc:
            log.warning(
                "migration relay: %s of %s/%s refused by %s: %s",
                stream.kind,
                stream.namespace,
                stream.migration,
                address,
                exc,
            )
            metrics.RELAY_STREAMS.labels("out", stream.kind, "refused").inc()
            local_writer.close()
            return
        except (OSError, ValueError, ssl.SSLError, TimeoutError) as exc:
            metrics.RELAY_STREAMS.labels("out", stream.kind, "failed").inc()
            log.warning(
                "migration relay: %s of %s/%s to %s: %s",
                stream.kind,
                stream.namespace,
                stream.migration,
                address,
                exc,
            )
            local_writer.close()
            return
        metrics.RELAY_STREAMS.labels("out", stream.kind, "relayed").inc()
        await _splice(local_reader, local_writer, *remote, a_to_b="out")

    async def _dial(
        self, stream: Stream, address: str, certificate: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.write(f"{self.node}\n".encode())
        await writer.drain()
        if await reader.readline() != b"go\n":
            writer.close()
            raise RelayError(f"the relay at {address} turned us away")
        await writer.start_tls(self.identity.context(False, certificate))
        if not _peer_is(writer, certificate):
            writer.close()
            raise RelayError(f"the relay at {address} is not the target node's")
        request = {
            "namespace": stream.namespace,
            "migration": stream.migration,
            "uid": stream.uid,
            "stream": stream.kind,
        }
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        answer = (await reader.readline()).decode("utf-8", "replace").strip()
        if answer != "ok":
            writer.close()
            raise RelayError(answer or "the target closed the connection")
        return reader, writer


async def _close(servers: list[asyncio.Server]) -> None:
    for server in servers:
        server.close()


async def _splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    a_to_b: str,
    judge: "Callable[[Packet], Packet] | None" = None,
) -> None:
    """Copy both ways until both directions end; ``a_to_b`` says whether a to b goes towards
    the other node ("out") or from it ("in"), for the byte counters. An end is passed on as a
    half-close where the socket has one (UNIX); TLS has none in asyncio, so there it closes the
    connection, which the relay at the other end passes on as a half-close. libvirt, QEMU's
    migration stream and NBD all end their connections with a full close, so nothing they send
    is cut off."""

    async def chunks(reader: asyncio.StreamReader, judged: bool) -> AsyncIterator[bytes]:
        """What to pass on: the bytes as read, or (``judged``) a libvirt RPC packet at a time,
        each judged first (off the loop: the judge may ask this node's libvirtd)."""
        if not judged:
            while chunk := await reader.read(CHUNK):
                yield chunk
            return
        assert judge is not None
        while (packet := await read_packet(reader)) is not None:
            yield (await asyncio.to_thread(judge, packet)).encode()

    async def pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str, judged: bool = False
    ) -> None:
        counter = metrics.RELAY_BYTES.labels(direction)
        try:
            async for chunk in chunks(reader, judged):
                writer.write(chunk)
                counter.inc(len(chunk))
                await writer.drain()
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        except RpcError as exc:
            log.warning("migration relay: cut a libvirt connection: %s", exc)
            metrics.RELAY_STREAMS.labels("in", "libvirt", "call-refused").inc()
            a_writer.close()
            writer.close()  # nothing of the refused call, nor after it, reaches libvirtd
            return
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()

    try:
        back = "in" if a_to_b == "out" else "out"
        await asyncio.gather(
            pump(a_reader, b_writer, a_to_b, judged=judge is not None), pump(b_reader, a_writer, back)
        )
    finally:
        for writer in (a_writer, b_writer):
            writer.close()
