"""Bring an image's bytes onto the node: stream an HTTP(S) download, or copy a hostPath file,
into a file of the cache's scratch directory, hashing as the bytes pass."""

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests
from urllib3.exceptions import HTTPError, ProtocolError

from formation_vmm.host.paths import open_new, open_read
from formation_vmm.images.formats import ImageRefusedError

Progress = Callable[[int, int | None], None]  # (bytes so far, total if known)
CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    connect_timeout: float = 10.0
    read_timeout: float = 60.0  # the longest silence tolerated mid-transfer


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


def download(
    url: str, dest: Path, limits: FetchLimits, progress: Progress, authorization: str | None = None
) -> Fetched:
    headers = {"User-Agent": "formation-vmm-agent"}
    if authorization:
        headers["Authorization"] = authorization
    done = 0
    total: int | None = None
    try:
        with requests.get(
            url, headers=headers, stream=True, timeout=(limits.connect_timeout, limits.read_timeout)
        ) as response:
            if response.status_code != 200:
                raise FetchError(
                    "DownloadFailed",
                    f"GET {_shown(url)} answered HTTP {response.status_code} {response.reason}",
                )
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            if total is not None and total > limits.max_bytes:
                raise ImageRefusedError(
                    "TooLarge", f"the image is {total} bytes, over the limit of {limits.max_bytes}"
                )
            with HashingWriter(dest) as sink:
                progress(0, total)
                # read1: whatever has arrived, up to CHUNK; big reads when the network is fast,
                # and progress still moves on a trickle.
                for chunk in iter(lambda: response.raw.read1(CHUNK, decode_content=True), b""):
                    done += len(chunk)
                    if done > limits.max_bytes:
                        raise ImageRefusedError(
                            "TooLarge", f"the download passed the limit of {limits.max_bytes} bytes"
                        )
                    sink.put(chunk)
                    progress(done, total)
            if total is not None and done != total:
                raise FetchError("DownloadFailed", f"the server closed after {done} of {total} bytes")
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, ProtocolError) as exc:
        if total is not None and 0 < done < total:
            raise FetchError(
                "DownloadFailed", f"the server closed the connection after {done} of {total} bytes"
            ) from exc
        raise FetchError(
            "DownloadFailed", f"GET {_shown(url)} failed after {done} bytes: {_brief(exc)}"
        ) from exc
    except (requests.RequestException, HTTPError) as exc:
        raise FetchError(
            "DownloadFailed", f"GET {_shown(url)} failed after {done} bytes: {_brief(exc)}"
        ) from exc
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
