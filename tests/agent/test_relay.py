"""The migration relay between two agents' relays in this process: real TLS on 127.0.0.1 and real
UNIX sockets. The target's "libvirtd" and "QEMU" are UNIX servers of the test that answer with
what they read, so every byte is seen crossing both ways; the VmMigration check and the
published certificates are the test's functions (the apiserver's part is covered by
tests/migration/test_vm_migration.py, which migrates real guests through the relay)."""

import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from formation_vmm.agent.migration.relay import SOCKETS, Identity, Relay, Stream, session_name

pytestmark = pytest.mark.host

UID = "0b7e9f4c-1d2a-4e5f-8a9b-0c1d2e3f4a5b"
ASKED = Stream("tenant", "move-web", UID, "memory")


def unix_server(path: Path, handle: Callable[[socket.socket], None]) -> socket.socket:
    """A UNIX server at ``path`` that hands each connection to ``handle``, in a thread of its own."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def echo_server(path: Path) -> socket.socket:
    """Reads a length-prefixed message and answers with its SHA-256, then closes: a request and
    an answer, as libvirt's RPC and NBD have them (no half-close)."""

    def answer(conn: socket.socket) -> None:
        with conn:
            wanted = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
            digest = hashlib.sha256()
            while wanted > 0 and (chunk := conn.recv(min(65536, wanted))):
                digest.update(chunk)
                wanted -= len(chunk)
            conn.sendall(digest.hexdigest().encode())

    return unix_server(path, answer)


class Pair:
    def __init__(self, root: Path) -> None:
        self.refusal: str | None = None
        self.asked: list[tuple[str, Stream]] = []
        ids = {n: Identity.load_or_create(root / n / "state", n) for n in ("src", "tgt", "other")}
        self.published = {"src": ids["src"].certificate, "tgt": ids["tgt"].certificate}
        self.ids = ids

        def authorize(source: str, stream: Stream) -> str | None:
            self.asked.append((source, stream))
            return self.refusal

        def make(node: str, identity: Identity) -> Relay:
            return Relay(
                node,
                identity,
                ("127.0.0.1", 0),
                root / node / "seen",  # as libvirtd would see it: only named in URIs here
                root / node / "relay",
                root / node / "libvirt-sock",
                authorize,
                self.published.get,
            )

        self.source = make("src", ids["src"])
        self.target = make("tgt", ids["tgt"])
        self.root = root

    def address(self) -> str:
        return f"127.0.0.1:{self.target.port}"


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    pair = Pair(tmp_path)
    pair.source.start()
    pair.target.start()
    yield pair
    pair.source.stop()
    pair.target.stop()


def send(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(20)
        conn.connect(str(path))
        conn.sendall(len(data).to_bytes(8, "big") + data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        return answer


def test_each_stream_crosses_to_its_socket_on_the_target(pair: Pair) -> None:
    libvirtd = echo_server(pair.root / "tgt" / "libvirt-sock")
    qemu = [echo_server(pair.target.incoming(UID) / SOCKETS[k]) for k in ("memory", "disks")]
    data = os.urandom(8 << 20)
    with pair.source.outgoing(ASKED, pair.address(), pair.published["tgt"]) as route:
        session = pair.root / "src" / "relay" / session_name(UID)
        assert route.agent_uri == f"qemu+unix:///system?socket={session / 'l.sock'}"
        assert route.memory_uri == f"unix://{pair.root / 'src' / 'seen' / session_name(UID) / 'm.sock'}"
        for kind in ("libvirt", "memory", "disks"):
            assert send(session / SOCKETS[kind], data).decode() == hashlib.sha256(data).hexdigest()
    assert [(source, s.kind) for source, s in pair.asked] == [
        ("src", "libvirt"),
        ("src", "memory"),
        ("src", "disks"),
    ]
    assert not (pair.root / "src" / "relay" / session_name(UID)).exists()  # the session's sockets went
    for server in (libvirtd, *qemu):
        server.close()


def test_a_stream_the_migration_does_not_allow_gets_nothing(pair: Pair) -> None:
    echo_server(pair.root / "tgt" / "libvirt-sock")
    pair.refusal = "the migration's target is node-x"
    with pair.source.outgoing(ASKED, pair.address(), pair.published["tgt"]):
        session = pair.root / "src" / "relay" / session_name(UID)
        assert send(session / "l.sock", b"hello") == b""  # closed, never connected through


def test_a_node_without_the_published_key_is_refused(pair: Pair) -> None:
    """A third party with a key of its own claims to be the source: the handshake fails, and the
    target never asks whether the migration allows it."""
    echo_server(pair.root / "tgt" / "libvirt-sock")
    impostor = Relay(
        "src",  # it says it is the source node
        pair.ids["other"],
        ("127.0.0.1", 0),
        pair.root / "other" / "seen",
        pair.root / "other" / "relay",
        pair.root / "other" / "libvirt-sock",
        lambda *_: None,
        pair.published.get,
    )
    impostor.start()
    try:
        with impostor.outgoing(ASKED, pair.address(), pair.published["tgt"]):
            session = pair.root / "other" / "relay" / session_name(UID)
            assert send(session / "l.sock", b"hello") == b""
    finally:
        impostor.stop()
    assert pair.asked == []


def test_a_target_that_is_not_the_published_node_gets_nothing(pair: Pair) -> None:
    """The source pins the target's published certificate: a relay with another key at that
    address never receives the request."""
    echo_server(pair.root / "tgt" / "libvirt-sock")
    with pair.source.outgoing(ASKED, pair.address(), pair.ids["other"].certificate):
        session = pair.root / "src" / "relay" / session_name(UID)
        assert send(session / "l.sock", b"hello") == b""
    assert pair.asked == []


def echo_forever(path: Path) -> socket.socket:
    """Answers each chunk with itself and never closes: a libvirtd connection kept open."""

    def echo(conn: socket.socket) -> None:
        with conn:
            while chunk := conn.recv(65536):
                conn.sendall(chunk)

    return unix_server(path, echo)


def test_a_stream_is_cut_once_its_migration_no_longer_asks_for_it(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compromised source keeps its connection to the target's libvirtd open after the
    migration ended (issue 26, finding 4): the target asks again every few seconds, and cuts the
    stream once the answer is no (the migration ended, failed, or ran past the target's own
    deadline: tests/agent/test_relay_access.py)."""
    monkeypatch.setattr("formation_vmm.agent.migration.relay.RECHECK_SECONDS", 0.2)
    libvirtd = echo_forever(pair.root / "tgt" / "libvirt-sock")
    with pair.source.outgoing(ASKED, pair.address(), pair.published["tgt"]):
        session = pair.root / "src" / "relay" / session_name(UID)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(20)
            conn.connect(str(session / "l.sock"))
            conn.sendall(b"ping")
            assert conn.recv(4, socket.MSG_WAITALL) == b"ping"  # carried, and held open
            pair.refusal = "the migration is Failed"
            assert conn.recv(65536) == b""  # cut by the target (a timeout here fails the test)
    assert len(pair.asked) >= 2  # asked when opened, and again
    libvirtd.close()
