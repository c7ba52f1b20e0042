"""Bring an image's bytes onto the node: stream an HTTP(S) download, or copy a hostPath file,
into a file of the cache's scratch directory, hashing as the bytes pass."""

import hashlib
import os
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import urllib3
from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError

from formation_vmm.host.paths import open_new, open_read
from formation_vmm.images.egress import EgressPolicy
from formation_vmm.images.formats import ImageRefusedError

Progress = Callable[[int, int | None], None]  # (bytes so far, total if known)
CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # the longest silence tolerated mid-transfer
    deadline: float = 3600.0  # the longest a whole download may take
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    ca_file: Path | None = None  # CA certificates for https sources, else the system's
    # qemu-img on the imported bytes runs under these (see host/sandbox.py).
    qemu_img_memory: int = 1 << 30
    qemu_img_cpu_seconds: int = 30


@dataclass(frozen=True)
class Fetched:
    path: Path
    sha256: str
    size: int


class FetchError(RuntimeError):
    """The source could not be read (HTTP status, connection, timeout); worth retrying later."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """Hashes and writes chunks in a thread of its own, so sha256 and the disk overlap with the
    network (hashlib and file writes release the GIL). fsync'd before it reports done."""

    def __init__(self, dest: Path) -> None:
        self._fd = open_new(dest)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=16)
        self._digest = hashlib.sha256()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="image-writer", daemon=True)
        self._thread.start()
        self.hexdigest = ""

    def _run(self) -> None:
        try:
            with os.fdopen(self._fd, "wb") as out:
                while (chunk := self._queue.get()) is not None:
                    if self._error is None:
                        self._digest.update(chunk)
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException as exc:  # reported to the reader in __exit__
            self._error = exc
            while self._queue.get() is not None:  # drain, so the reader never blocks on put
                pass

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc[0] is None:
            raise self._error
        self.hexdigest = self._digest.hexdigest()


REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
Resolver = Callable[[str, int], list[str]]  # (host, port) -> the addresses it names


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, once: the connection goes to one of these, checked,
    never to a second lookup an attacker's DNS could answer differently."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str
    port: int
    path: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    @property
    def host_header(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return shown if self.port == default else f"{shown}:{self.port}"


def _target(url: str) -> _Target:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError("DownloadFailed", f"{_shown(url)} is not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise FetchError("DownloadFailed", f"{_shown(url)} has no valid port") from exc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(parts.scheme, parts.hostname, port, path)


def _pool(target: _Target, address: str, limits: FetchLimits) -> urllib3.HTTPConnectionPool:
    """A connection pool to the checked address; TLS checks the certificate against the URL's
    host name, not the address."""
    timeout = urllib3.Timeout(connect=limits.connect_timeout, read=limits.read_timeout)
    if target.scheme == "https":
        context = ssl.create_default_context(cafile=str(limits.ca_file) if limits.ca_file else None)
        return urllib3.HTTPSConnectionPool(
            address,
            target.port,
            timeout=timeout,
            retries=False,
            ssl_context=context,
            server_hostname=target.host,
            assert_hostname=target.host,
        )
    return urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False)


def download(
    url: str,
    dest: Path,
    limits: FetchLimits,
    progress: Progress,
    authorization: str | None = None,
    resolver: Resolver = resolve,
) -> Fetched:
    """Stream ``url`` into ``dest``. Every hop (the URL and each redirect) is resolved once and
    every address checked against the egress policy before a connection is made; the body is
    stored as sent (no content-encoding is undone: the image pipeline reads what it is); proxies
    and .netrc are not consulted. Failures to connect say no more than that, so the agent never
    tells a tenant which ports answer where."""
    deadline = time.monotonic() + limits.deadline
    current, origin = url, _target(url).origin
    for _ in range(MAX_REDIRECTS + 1):
        target = _target(current)
        addresses = resolver(target.host, target.port)
        if not addresses:
            raise FetchError("DownloadFailed", f"cannot resolve {target.host}")
        if not limits.egress.permits_all(addresses):
            raise FetchError(
                "EgressRefused",
                f"{_shown(current)}: {target.host} is not an address images may be fetched from "
                "in this cluster (see the agent's egress policy)",
            )
        headers = {
            "User-Agent": "formation-vmm-agent",
            "Host": target.host_header,
            "Accept-Encoding": "identity",
        }
        if authorization and target.origin == origin:  # credentials never follow a redirect away
            headers["Authorization"] = authorization
        pool = _pool(target, addresses[0], limits)
        try:
            response = pool.urlopen(
                "GET",
                target.path,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                decode_content=False,
            )
        except (HTTPError, OSError) as exc:
            raise FetchError(
                "DownloadFailed", f"cannot connect to {target.host}:{target.port} (or complete TLS with it)"
            ) from exc
        try:
            if response.status in REDIRECTS:
                location = response.headers.get("Location")
                if not location:
                    raise FetchError("DownloadFailed", f"GET {_shown(current)} redirected nowhere")
                current = urllib.parse.urljoin(current, location)
                continue
            if response.status != 200:
                raise FetchError(
                    "DownloadFailed",
                    f"GET {_shown(current)} answered HTTP {response.status} {response.reason}",
                )
            return _receive(response, current, dest, limits, progress, deadline)
        finally:
            response.release_conn()
            pool.close()
    raise FetchError("DownloadFailed", f"GET {_shown(url)} redirected more than {MAX_REDIRECTS} times")


def _receive(
    response: urllib3.BaseHTTPResponse,
    url: str,
    dest: Path,
    limits: FetchLimits,
    progress: Progress,
    deadline: float,
) -> Fetched:
    done = 0
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    if total is not None and total > limits.max_bytes:
        raise ImageRefusedError(
            "TooLarge", f"the image is {total} bytes, over the limit of {limits.max_bytes}"
        )
    try:
        with HashingWriter(dest) as sink:
            progress(0, total)
            # read1: whatever has arrived, up to CHUNK; big reads when the network is fast, and
            # progress still moves on a trickle.
            for chunk in iter(lambda: response.read1(CHUNK), b""):
                done += len(chunk)
                if done > limits.max_bytes:
                    raise ImageRefusedError(
                        "TooLarge", f"the download passed the limit of {limits.max_bytes} bytes"
                    )
                if time.monotonic() > deadline:
                    raise FetchError(
                        "DownloadFailed", f"the download took longer than {limits.deadline:.0f}s in all"
                    )
                sink.put(chunk)
                progress(done, total)
    except (ReadTimeoutError, TimeoutError) as exc:
        raise FetchError(
            "DownloadFailed",
            f"GET {_shown(url)} timed out: nothing arrived for {limits.read_timeout:.0f}s after {done} bytes",
        ) from exc
    except (ProtocolError, HTTPError, OSError) as exc:
        if total is not None and 0 < done < total:
            raise FetchError(
                "DownloadFailed", f"the server closed the connection after {done} of {total} bytes"
            ) from exc
        raise FetchError(
            "DownloadFailed", f"GET {_shown(url)} failed after {done} bytes: {_brief(exc)}"
        ) from exc
    if total is not None and done != total:
        raise FetchError("DownloadFailed", f"the server closed after {done} of {total} bytes")
    return Fetched(dest, sink.hexdigest, done)


def copy_local(source: Path, dest: Path, limits: FetchLimits, progress: Progress) -> Fetched:
    """Copy a hostPath image (already checked to lie inside the images directory)."""
    digest = hashlib.sha256()
    done = 0
    fd_in = open_read(source)
    with os.fdopen(fd_in, "rb") as src, os.fdopen(open_new(dest), "wb") as out:
        total = os.fstat(src.fileno()).st_size
        if total > limits.max_bytes:
            raise ImageRefusedError(
                "TooLarge", f"the image is {total} bytes, over the limit of {limits.max_bytes}"
            )
        for chunk in iter(lambda: src.read(CHUNK), b""):
            done += len(chunk)
            digest.update(chunk)
            out.write(chunk)
            progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return Fetched(dest, digest.hexdigest(), done)


def _shown(url: str) -> str:
    """The URL without user info or query, which may carry credentials."""
    cut = url.split("?", 1)[0].split("#", 1)[0]
    scheme, _, rest = cut.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def _brief(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) < 200 else text[:200] + "..."


class Throttle:
    """Call ``report`` at most every ``interval`` seconds, and always for the last value."""

    def __init__(self, report: Progress, interval: float) -> None:
        self.report = report
        self.interval = interval
        self._last = 0.0

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval or (total is not None and done >= total):
            self._last = now
            self.report(done, total)
