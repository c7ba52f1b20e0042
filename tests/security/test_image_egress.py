"""Image downloads as a tenant would abuse them: the URL, every redirect and every name are held
to the egress policy before a connection is made; proxies and .netrc are not consulted; the
body is stored as sent; nothing tells a tenant which ports answer. Real servers on loopback
addresses only (127.0.0.1 allowed by the test's policy, 127.0.0.2 refused), nothing else."""

import datetime
import gzip
import ipaddress
import os
import ssl
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from formation_vmm.devcluster.processes import free_port
from formation_vmm.images.egress import EgressPolicy
from formation_vmm.images.fetch import FetchError, FetchLimits, download
from formation_vmm.images.formats import ImageRefusedError
from tests.support import image_files as files
from tests.support.image_server import ImageServer, _handler, serve

pytestmark = pytest.mark.host

ALLOW_ONE = EgressPolicy.from_settings(["127.0.0.1/32"], None)


def limits(**kw: object) -> FetchLimits:
    return FetchLimits(**{"max_bytes": 64 << 20, "read_timeout": 5, "egress": ALLOW_ONE, **kw})  # type: ignore[arg-type]


def nothing(done: int, total: int | None) -> None:
    pass


@pytest.fixture
def content(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    files.raw(root / "disk.raw")
    return root


@pytest.fixture
def allowed(content: Path) -> Iterator[ImageServer]:
    with serve(content, "127.0.0.1") as srv:
        yield srv


@pytest.fixture
def refused(content: Path) -> Iterator[ImageServer]:
    with serve(content, "127.0.0.2") as srv:
        yield srv


def test_an_allowed_address_is_fetched(allowed: ImageServer, tmp_path: Path) -> None:
    got = download(allowed.url("/files/disk.raw"), tmp_path / "out", limits(), nothing)
    assert got.size == 2 * files.MIB
    assert allowed.headers[-1]["Accept-Encoding"] == "identity"


def test_the_default_policy_refuses_the_node_itself(allowed: ImageServer, tmp_path: Path) -> None:
    with pytest.raises(FetchError) as err:
        download(allowed.url("/files/disk.raw"), tmp_path / "out", limits(egress=EgressPolicy()), nothing)
    assert err.value.reason == "EgressRefused"
    assert allowed.requests == []  # not one packet reached it


def test_an_address_outside_the_allowed_ranges_is_refused_before_any_connection(
    refused: ImageServer, tmp_path: Path
) -> None:
    with pytest.raises(FetchError) as err:
        download(refused.url("/files/disk.raw"), tmp_path / "out", limits(), nothing)
    assert err.value.reason == "EgressRefused"
    assert "egress policy" in str(err.value)
    assert refused.requests == []


def test_a_redirect_is_held_to_the_policy_like_the_url(
    allowed: ImageServer, refused: ImageServer, tmp_path: Path
) -> None:
    bounce = allowed.redirect_to(refused.url("/files/disk.raw"))
    with pytest.raises(FetchError) as err:
        download(bounce, tmp_path / "out", limits(), nothing)
    assert err.value.reason == "EgressRefused"
    assert len(allowed.requests) == 1 and refused.requests == []


def test_credentials_do_not_follow_a_redirect_to_another_origin(content: Path, tmp_path: Path) -> None:
    with serve(content, "127.0.0.1") as first, serve(content, "127.0.0.1") as second:
        same = first.redirect_to(first.url("/files/disk.raw"))
        download(same, tmp_path / "a", limits(), nothing, authorization="Bearer s3cret")
        assert [h.get("Authorization") for h in first.headers] == ["Bearer s3cret", "Bearer s3cret"]
        away = first.redirect_to(second.url("/files/disk.raw"))
        download(away, tmp_path / "b", limits(), nothing, authorization="Bearer s3cret")
        assert "Authorization" not in second.headers[-1]


def test_a_redirect_loop_ends(allowed: ImageServer, tmp_path: Path) -> None:
    url = allowed.url("/files/disk.raw")
    for _ in range(7):
        url = allowed.redirect_to(url)
    with pytest.raises(FetchError, match="redirected more than 5 times"):
        download(url, tmp_path / "out", limits(), nothing)


def test_a_name_is_resolved_once_and_held_to_the_policy_by_every_address(
    allowed: ImageServer, tmp_path: Path
) -> None:
    # This machine's resolver has no name that answers with both an allowed and a refused
    # address (and the test must not edit /etc/hosts), so the answer is given here: the one
    # stand-in of this module. The connection itself is real.
    asked: list[str] = []

    def answers(host: str, port: int) -> list[str]:
        asked.append(host)
        return {"images.example": ["127.0.0.1"], "mixed.example": ["127.0.0.1", "10.1.2.3"]}[host]

    url = f"http://images.example:{allowed.port}/files/disk.raw"
    assert download(url, tmp_path / "ok", limits(), nothing, resolver=answers).size == 2 * files.MIB
    assert allowed.headers[-1]["Host"] == f"images.example:{allowed.port}"  # asked by name, at the address
    mixed = f"http://mixed.example:{allowed.port}/files/disk.raw"
    with pytest.raises(FetchError) as err:
        download(mixed, tmp_path / "no", limits(), nothing, resolver=answers)
    assert err.value.reason == "EgressRefused"
    assert asked == ["images.example", "mixed.example"]  # once each: no second lookup to rebind
    assert len(allowed.requests) == 1


def test_a_closed_port_says_no_more_than_that(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(FetchError) as err:
        download(f"http://127.0.0.1:{port}/x", tmp_path / "out", limits(), nothing)
    assert str(err.value) == f"cannot connect to 127.0.0.1:{port} (or complete TLS with it)"


def test_proxies_and_netrc_are_not_consulted(
    allowed: ImageServer, content: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with serve(content, "127.0.0.1") as proxy:
        for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "ALL_PROXY"):
            monkeypatch.setenv(var, proxy.url(""))
        home = tmp_path / "home"
        home.mkdir()
        (home / ".netrc").write_text("machine 127.0.0.1 login tenant password stolen\n")
        monkeypatch.setenv("HOME", str(home))
        download(allowed.url("/files/disk.raw"), tmp_path / "out", limits(), nothing)
        assert proxy.requests == []
    assert "Authorization" not in allowed.headers[-1]


def test_a_content_encoding_is_stored_as_sent(allowed: ImageServer, tmp_path: Path, content: Path) -> None:
    got = download(allowed.url("/encoded/disk.raw"), tmp_path / "out", limits(), nothing)
    stored = got.path.read_bytes()
    assert stored[:2] == b"\x1f\x8b"  # the pipeline unpacks it, bounded, like any gzip image
    assert gzip.decompress(stored) == (content / "disk.raw").read_bytes()


def test_a_download_has_a_deadline_however_steady_the_trickle(allowed: ImageServer, tmp_path: Path) -> None:
    allowed.slow_delay = 0.3
    with pytest.raises(FetchError, match="took longer than 1s in all"):
        download(allowed.url("/slow/disk.raw"), tmp_path / "out", limits(deadline=1.0), nothing)


def test_a_size_limit_holds_without_a_content_length(allowed: ImageServer, tmp_path: Path) -> None:
    with pytest.raises(ImageRefusedError) as err:
        download(allowed.url("/files/disk.raw"), tmp_path / "out", limits(max_bytes=files.MIB), nothing)
    assert err.value.reason == "TooLarge"


@pytest.fixture
def tls_server(content: Path, tmp_path: Path) -> Iterator[tuple[ImageServer, Path]]:
    """An https server on 127.0.0.1 whose certificate a test CA signed."""
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = tmp_path / "server.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = ImageServer(content)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pem)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    server.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield server, ca_file
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_checks_the_certificate_against_the_configured_authorities(
    tls_server: tuple[ImageServer, Path], tmp_path: Path
) -> None:
    server, ca_file = tls_server
    url = f"https://127.0.0.1:{server.port}/files/disk.raw"
    assert download(url, tmp_path / "ok", limits(ca_file=ca_file), nothing).size == 2 * files.MIB
    with pytest.raises(FetchError, match="or complete TLS with it"):
        download(url, tmp_path / "untrusted", limits(), nothing)
    assert os.path.exists(tmp_path / "ok")
