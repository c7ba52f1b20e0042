"""Self-signed identities, and the TLS of our two private links: the apiserver to the
controller's aggregated API (the apiserver's front-proxy certificate, signed by the CA the
apiserver publishes), and the controller to an agent (both sides pinned to the certificate the
other publishes through the API).

Trust read from the API can change while a server listens. A listening context's store only
grows (OpenSSL shares it with open connections), so the handshake checks possession of a key the
store knows, and the request's handler checks the peer against what the API says now
(``issued_by``, ``same_certificate``): a certificate replaced in the API is refused at once."""

import datetime
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class KeyPair:
    key_pem: bytes
    cert_pem: str

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``<stem>.crt`` and ``<stem>.key`` in ``directory`` (made private), for load_cert_chain."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.crt"
        tmp = key_path.with_suffix(".tmp")
        tmp.touch(mode=0o600)
        tmp.write_bytes(self.key_pem)
        tmp.replace(key_path)
        cert_path.write_text(self.cert_pem)
        return cert_path, key_path

    def load_into(self, ctx: ssl.SSLContext) -> None:
        """``ctx`` shows this pair, read from memory files: the controller's pod has a read-only
        root filesystem, and the key needs no home on any disk."""
        fds: list[int] = []
        try:
            for data in (self.cert_pem.encode(), self.key_pem):
                fds.append(os.memfd_create("formation-vmm-tls", os.MFD_CLOEXEC))
                os.write(fds[-1], data)
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)


def self_signed(common_name: str, dns_names: tuple[str, ...] = (), days: int = 3650) -> KeyPair:
    """A P-256 key and a certificate it signs itself, its own trust anchor (CA, no path below):
    a peer that trusts exactly this certificate trusts exactly its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names or (common_name,)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return KeyPair(key_pem, cert.public_bytes(serialization.Encoding.PEM).decode())


def der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def same_certificate(peer_der: bytes | None, pem: str) -> bool:
    return peer_der is not None and peer_der == der(pem)


def issued_by(peer_der: bytes | None, ca_pem: str) -> x509.Certificate | None:
    """The peer's certificate when one of the CAs in ``ca_pem`` signed it, else None."""
    if peer_der is None:
        return None
    peer = x509.load_der_x509_certificate(peer_der)
    for ca in x509.load_pem_x509_certificates(ca_pem.encode()):
        try:
            peer.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):  # not this CA
            continue
        return peer
    return None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def server_context(pair: KeyPair) -> ssl.SSLContext:
    """A server that requires a client certificate from a CA it is told later (GrowingTrust)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    pair.load_into(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class GrowingTrust:
    """The CAs a listening ``context`` accepts client certificates from: each new one the API
    shows is added (the store cannot drop one; the handlers check against the current one)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self._seen: set[str] = set()

    def add(self, pem: str) -> None:
        if pem and pem not in self._seen:
            self.context.load_verify_locations(cadata=pem)
            self._seen.add(pem)


def pinned_client(pair: KeyPair, peer_pem: str) -> ssl.SSLContext:
    """A client that shows ``pair`` and trusts exactly ``peer_pem``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    pair.load_into(ctx)
    ctx.load_verify_locations(cadata=peer_pem)
    ctx.check_hostname = False  # pinned by its certificate, not by a name
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
