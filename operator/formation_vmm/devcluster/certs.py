"""The PKI a local control plane needs: a CA, the apiserver's serving cert, an admin client cert
(group system:masters), the service-account signing key, and the front proxy's own CA and
client cert (what the apiserver shows aggregated API servers it proxies to)."""

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALIDITY = datetime.timedelta(days=365)
# The front proxy's common name, the one the apiserver tells aggregated API servers to accept.
FRONT_PROXY_CLIENT = "front-proxy-client"


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
    server_ips: tuple[str, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.DNSName("kubernetes.default.svc"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips),
                ]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(directory: Path, server_ips: tuple[str, ...] = ()) -> None:
    """Write ca.crt, server.{crt,key}, admin.{crt,key}, sa.{key,pub} into ``directory``. The
    apiserver's certificate names localhost, 127.0.0.1 and ``server_ips`` (a node's address and
    the ``kubernetes`` Service's, where pods reach it)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("formation-vmm-dev-ca")
    _write_cert(_issue(ca_name, ca_key, ca_name, ca_key, ca=True), directory / "ca.crt")
    _write_key(ca_key, directory / "ca.key")

    server_key = _key()
    _write_cert(
        _issue(_name("kube-apiserver"), server_key, ca_name, ca_key, server=True, server_ips=server_ips),
        directory / "server.crt",
    )
    _write_key(server_key, directory / "server.key")

    admin_key = _key()
    _write_cert(_issue(_name("admin", "system:masters"), admin_key, ca_name, ca_key), directory / "admin.crt")
    _write_key(admin_key, directory / "admin.key")

    proxy_ca_key = _key()
    proxy_ca_name = _name("formation-vmm-dev-front-proxy-ca")
    _write_cert(
        _issue(proxy_ca_name, proxy_ca_key, proxy_ca_name, proxy_ca_key, ca=True),
        directory / "front-proxy-ca.crt",
    )
    proxy_key = _key()
    _write_cert(
        _issue(_name(FRONT_PROXY_CLIENT), proxy_key, proxy_ca_name, proxy_ca_key),
        directory / "front-proxy-client.crt",
    )
    _write_key(proxy_key, directory / "front-proxy-client.key")

    sa_key = _key()
    _write_key(sa_key, directory / "sa.key")
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def issue_client(directory: Path, name: str, cn: str, org: str | None = None) -> None:
    """``<name>.crt`` and ``<name>.key``: a client certificate from the CA of ``make_pki`` (a
    kubelet's is ``system:node:<node>`` in group ``system:nodes``, for the Node authorizer)."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _key()
    _write_cert(_issue(_name(cn, org), key, _name("formation-vmm-dev-ca"), ca_key), directory / f"{name}.crt")
    _write_key(key, directory / f"{name}.key")
