"""Who the apiserver says a proxied request is for: the front proxy's headers, believed only
from a client certificate the apiserver's request-header CA signed, with a common name it allows
(``kube-system/extension-apiserver-authentication``, which the apiserver keeps current), as any
aggregated API server does. Anything else is nobody."""

import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from multidict import MultiMapping

from formation_vmm import tls
from formation_vmm.kube import ApiError, Body

log = logging.getLogger(__name__)

AUTHENTICATION_NAMESPACE = "kube-system"
AUTHENTICATION_CONFIG_MAP = "extension-apiserver-authentication"
REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class RequestHeaders:
    """The apiserver's front-proxy settings, as it publishes them."""

    ca: str = ""
    allowed_names: tuple[str, ...] = ()
    username: tuple[str, ...] = ()
    uid: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    extra_prefixes: tuple[str, ...] = ()

    @staticmethod
    def of(config_map: Body) -> "RequestHeaders":
        data = config_map.get("data") or {}

        def listed(key: str) -> tuple[str, ...]:
            try:
                value = json.loads(data.get(key) or "[]")
            except ValueError:
                return ()
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        return RequestHeaders(
            ca=str(data.get("requestheader-client-ca-file") or ""),
            allowed_names=listed("requestheader-allowed-names"),
            username=listed("requestheader-username-headers"),
            uid=listed("requestheader-uid-headers"),
            groups=listed("requestheader-group-headers"),
            extra_prefixes=listed("requestheader-extra-headers-prefix"),
        )


@dataclass
class FrontProxy:
    read: Callable[[], Body]
    on_ca: Callable[[str], None] = lambda _: None  # a CA to accept client certificates from
    headers: RequestHeaders = field(default_factory=RequestHeaders)
    _read_at: float = float("-inf")

    def refresh(self) -> None:
        """Read the apiserver's settings again when due (blocking: off the event loop)."""
        if time.monotonic() - self._read_at < REFRESH_SECONDS:
            return
        self._read_at = time.monotonic()
        try:
            self.headers = RequestHeaders.of(self.read())
        except (ApiError, OSError, ValueError) as exc:  # keep the last settings
            log.warning("cannot read %s/%s: %s", AUTHENTICATION_NAMESPACE, AUTHENTICATION_CONFIG_MAP, exc)
            return
        if not self.headers.ca:
            log.warning(
                "the apiserver publishes no request-header CA: it proxies to no aggregated API "
                "(kube-apiserver --requestheader-client-ca-file); consoles are unavailable"
            )
        self.on_ca(self.headers.ca)

    def user(self, peer_der: bytes | None, headers: MultiMapping[str]) -> Body | None:
        """The user the request is for (username, uid, groups, extra), or None when it does
        not come from the apiserver's front proxy or names nobody."""
        settings = self.headers
        if not settings.ca:
            return None
        peer = tls.issued_by(peer_der, settings.ca)
        if peer is None:
            return None
        if settings.allowed_names and tls.common_name(peer) not in settings.allowed_names:
            return None
        username = _first(headers, settings.username)
        if not username:
            return None
        user: dict[str, Any] = {"username": username, "groups": _all(headers, settings.groups)}
        uid = _first(headers, settings.uid)
        if uid:
            user["uid"] = uid
        extra: dict[str, list[str]] = {}
        for name in dict.fromkeys(key.lower() for key in headers):
            for prefix in settings.extra_prefixes:
                if name.lower().startswith(prefix.lower()):
                    key = urllib.parse.unquote(name[len(prefix) :]).lower()
                    extra.setdefault(key, []).extend(_all(headers, (name,)))
        if extra:
            user["extra"] = extra
        return user


def _first(headers: MultiMapping[str], names: tuple[str, ...]) -> str:
    for name in names:
        value = headers.get(name, "")
        if value:
            return value
    return ""


def _all(headers: MultiMapping[str], names: tuple[str, ...]) -> list[str]:
    values = [value for name in names for value in headers.getall(name, [])]
    return [v for v in dict.fromkeys(values) if v]
