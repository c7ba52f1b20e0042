"""Who a proxied request is for: believed only from the apiserver's front-proxy certificate
(signed by the CA it publishes, with a name it allows), from the headers it says it uses."""

from pathlib import Path

import pytest
from multidict import CIMultiDict

from formation_vmm import tls
from formation_vmm.controller.serving.front_proxy import FrontProxy, RequestHeaders
from formation_vmm.devcluster import certs

pytestmark = pytest.mark.pure

SETTINGS = {
    "requestheader-allowed-names": '["front-proxy-client"]',
    "requestheader-username-headers": '["X-Remote-User"]',
    "requestheader-uid-headers": '["X-Remote-Uid"]',
    "requestheader-group-headers": '["X-Remote-Group"]',
    "requestheader-extra-headers-prefix": '["X-Remote-Extra-"]',
}


def proxy(tmp_path: Path) -> tuple[FrontProxy, bytes, list[str]]:
    """The real PKI of a dev control plane: its front-proxy CA and client certificate."""
    certs.make_pki(tmp_path)
    ca = (tmp_path / "front-proxy-ca.crt").read_text()
    seen: list[str] = []
    front = FrontProxy(lambda: {"data": {"requestheader-client-ca-file": ca, **SETTINGS}}, seen.append)
    front.refresh()
    return front, tls.der((tmp_path / "front-proxy-client.crt").read_text()), seen


def test_the_front_proxy_names_the_user(tmp_path: Path) -> None:
    front, client, seen = proxy(tmp_path)
    assert seen == [(tmp_path / "front-proxy-ca.crt").read_text()]  # the TLS port learns the CA
    headers = CIMultiDict(
        [
            ("X-Remote-User", "alice"),
            ("X-Remote-Uid", "u-1"),
            ("X-Remote-Group", "dev"),
            ("X-Remote-Group", "system:authenticated"),
            ("X-Remote-Extra-Scopes%2Fread", "a"),
            ("X-Remote-Extra-Scopes%2Fread", "b"),
        ]
    )
    assert front.user(client, headers) == {
        "username": "alice",
        "uid": "u-1",
        "groups": ["dev", "system:authenticated"],
        "extra": {"scopes/read": ["a", "b"]},
    }


def test_anyone_else_is_nobody(tmp_path: Path) -> None:
    front, client, _ = proxy(tmp_path)
    admin = CIMultiDict([("X-Remote-User", "admin"), ("X-Remote-Group", "system:masters")])
    assert front.user(None, admin) is None  # no certificate
    own = tls.der(tls.self_signed("front-proxy-client").cert_pem)
    assert front.user(own, admin) is None  # a certificate of one's own, with the allowed name
    # A client certificate of the cluster's main CA (the admin's), not the front proxy's.
    assert front.user(tls.der((tmp_path / "admin.crt").read_text()), admin) is None
    assert front.user(client, CIMultiDict([("X-Remote-Group", "dev")])) is None  # names no user


def test_a_name_the_apiserver_does_not_allow_is_refused(tmp_path: Path) -> None:
    front, client, _ = proxy(tmp_path)
    front.headers = RequestHeaders(**{**front.headers.__dict__, "allowed_names": ("someone-else",)})
    assert front.user(client, CIMultiDict([("X-Remote-User", "alice")])) is None


def test_an_apiserver_without_the_aggregation_layer_proxies_nothing(tmp_path: Path) -> None:
    certs.make_pki(tmp_path)
    front = FrontProxy(lambda: {"data": {}})
    front.refresh()
    client = tls.der((tmp_path / "front-proxy-client.crt").read_text())
    assert front.user(client, CIMultiDict([("X-Remote-User", "alice")])) is None
