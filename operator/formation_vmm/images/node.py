"""This node's side of every VmImage: import on demand (or at once with ``prefetch: AllNodes``)
in background threads, report the node's entry in the VmImage's status, and answer a VM's sync
with the cached base or with why it must wait. A sync never blocks on a download."""

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from formation_vmm import metrics
from formation_vmm.api.models import ImagePhase, VmImage, VmImageStatus
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import UnsafeNameError
from formation_vmm.domain.spec import BaseImage
from formation_vmm.host.paths import UnsafePathError, ensure_inside
from formation_vmm.images import fetch
from formation_vmm.images.cache import ImageCache
from formation_vmm.images.fetch import FetchError, FetchLimits, Throttle
from formation_vmm.images.formats import ImageRefusedError, progress_text
from formation_vmm.images.overlays import backs, overlay_bases, size_of
from formation_vmm.images.pipeline import Expectation, import_fetched
from formation_vmm.images.reporting import LatestReporter
from formation_vmm.images.scheduling import FairPool

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
Report = Callable[[VmImage, ImagePhase, str | None, VmImageStatus], None]  # image, phase, message, details
Authorization = Callable[[VmImage], str]  # the image -> its secretRef's Authorization value
Notify = Callable[[str, str], None]  # (namespace, name): the image's state on this node changed

# The longest an import the agent died in waits before it is tried again.
INTERRUPTED_RETRY_MAX = 3600.0
# Failures that only wait for the controller (sealed credentials), retried at the next look.
WAITING_REASONS = ("SecretNotSealed", "SecretNotFound")
WAITING_RETRY = 1.0


class ImageNotReadyError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class _State:
    spec_key: str
    phase: str = "Pending"
    reason: str = "ImagePending"
    message: str = ""
    progress: str = ""
    cached: BaseImage | None = None
    failed_at: float = 0.0
    retry_after: float = 0.0  # seconds after failed_at; 0: the node's retry_seconds
    running: bool = False
    attempts: int = 1  # this import's attempt, counting the ones the agent died in
    credentials: str | None = None  # the sealed credentials this node had when it last tried


def spec_key(image: VmImage, layout: NodeLayout) -> str:
    """Identifies what the spec asks for; a hostPath file that changed is a new import. The
    namespace and the secret are part of it: bytes fetched with one namespace's credentials are
    never handed to another namespace by URL alone (by content hash, only after its own fetch)."""
    spec = image.spec
    ident: dict[str, Any] = {"ns": image.metadata.namespace, "format": spec.format, "checksum": spec.checksum}
    if spec.source.http is not None:
        ident["url"] = spec.source.http.url
        if spec.source.http.secret_ref is not None:
            ident["secret"] = [spec.source.http.secret_ref.name, spec.source.http.secret_ref.key]
    elif spec.source.host_path is not None:
        path = host_path(image, layout)
        stat = path.stat()
        ident["path"] = spec.source.host_path.path
        ident["stat"] = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def host_path(image: VmImage, layout: NodeLayout) -> Path:
    assert image.spec.source.host_path is not None
    relative = image.spec.source.host_path.path
    try:
        path = layout.image_path(relative)
        ensure_inside(layout.images_dir, path)
    except (UnsafeNameError, UnsafePathError) as exc:
        raise ImageRefusedError("ImagePathRefused", str(exc)) from exc
    if not path.is_file():
        raise FetchError("ImageMissing", f"{relative} is not a file in this node's images directory")
    return path


class NodeImages:
    def __init__(
        self,
        node: str,
        layout: NodeLayout,
        limits: FetchLimits,
        report: Report,
        authorization: Authorization,
        notify: Notify | None = None,
        retry_seconds: float = 60.0,
        progress_seconds: float = 3.0,
        workers: int = 2,
        per_namespace: int = 1,
        max_cache_bytes: int = 0,
    ) -> None:
        self.node = node
        self.max_cache_bytes = max_cache_bytes  # 0: no cap
        self.layout = layout
        self.cache = ImageCache(layout.cache_dir)
        self.limits = limits
        self.report = report
        self.authorization = authorization
        self.notify = notify
        self.retry_seconds = retry_seconds
        self.progress_seconds = progress_seconds
        self._states: dict[Key, _State] = {}
        self._lock = threading.Lock()
        self._pool = FairPool(workers, per_namespace)
        self._reporter = LatestReporter(self._write_report)
        self._setup_done = False
        self._interrupted: dict[str, int] = {}

    def _setup(self) -> None:
        with self._lock:
            if not self._setup_done:
                self.cache.setup()
                self._interrupted = self.cache.interrupted()
                self._setup_done = True

    def close(self) -> None:
        self._pool.close()
        self._reporter.close()

    def ensure(self, image: VmImage) -> BaseImage:
        """The cached base of ``image``, or ImageNotReadyError (an import is started if none runs)."""
        self._setup()
        key = (image.metadata.namespace or "", image.metadata.name)
        try:
            wanted = spec_key(image, self.layout)
        except (ImageRefusedError, FetchError) as exc:
            self._fail_now(image, key, exc)
            raise ImageNotReadyError(exc.reason, f"VmImage {image.metadata.name}: {exc}") from exc
        with self._lock:
            state = self._states.get(key)
            if state is None or state.spec_key != wanted:
                state = _State(spec_key=wanted)
                self._states[key] = state
                recalled = self.cache.recall_spec(wanted)
                if recalled is not None:
                    state.phase, state.cached = "Ready", recalled
                elif wanted in self._interrupted:
                    self._mark_interrupted(state, self._interrupted.pop(wanted))
            newly_full = False
            if state.cached is not None and state.cached.path.is_file():
                cached = state.cached
                mine = [n for n in image.status.nodes if n.name == self.node]
                stale = not mine or mine[0].phase != "Ready"
            else:
                cached = None
                stale = False
                if state.cached is not None:  # the base vanished from disk: fetch again
                    state.cached, state.phase = None, "Pending"
                wait = state.retry_after or self.retry_seconds
                retry_due = state.phase == "Failed" and (
                    time.monotonic() - state.failed_at >= wait
                    or (state.reason in WAITING_REASONS and self._credentials(image) != state.credentials)
                )
                if not state.running and (state.phase != "Failed" or retry_due):
                    newly_full = not self._start_import(image, key, wanted, state)
                reason, message = state.reason, state.message
                phase, progress = state.phase, state.progress
        if cached is not None:
            if stale:  # recalled from disk by a restarted agent: say so in the status once
                self._safe_report(image, "Ready", None, _details(cached))
            return cached
        if phase == "Failed":
            if newly_full:
                self._safe_report(image, "Failed", message, VmImageStatus(progress=""))
            raise ImageNotReadyError(reason, f"VmImage {image.metadata.name}: {message}")
        shown = f" ({progress})" if progress else ""
        raise ImageNotReadyError(
            "ImageDownloading", f"VmImage {image.metadata.name} is {phase.lower()} on this node{shown}"
        )

    def _start_import(self, image: VmImage, key: Key, wanted: str, state: _State) -> bool:
        """Queue the import (under the lock), unless the cache is full: False then, and the
        state says why."""
        full = self._cache_full()
        if full is not None:
            state.phase, state.reason, state.message = "Failed", "ImageCacheFull", full
            state.failed_at, state.retry_after = time.monotonic(), 0.0
            return False
        state.running = True
        state.credentials = self._credentials(image)
        state.phase, state.reason, state.message = "Pending", "ImagePending", "queued"
        self._pool.submit(key[0], lambda: self._import(image, key, wanted))
        return True

    def _cache_full(self) -> str | None:
        """Why no import may start now: the bases VMs here use fill the cache's cap (those no
        VM uses do not count: the collector removes them when the cache is past its cap)."""
        if not self.max_cache_bytes:
            return None
        bases = overlay_bases(self.layout.disks_dir)
        held = sum(
            size_of(p) for paths in self.cache.blobs_on_disk().values() if backs(paths, bases) for p in paths
        )
        if held < self.max_cache_bytes:
            return None
        return (
            f"the image cache of node {self.node} holds {held} bytes, its cap is {self.max_cache_bytes} "
            "(image_cache_max_bytes); the bases in it back VMs' disks here. It is tried again later"
        )

    def forget_base(self, sha256: str) -> None:
        """A base the collector removed: VmImages that resolved to it are fetched again."""
        with self._lock:
            for state in self._states.values():
                if state.cached is not None and state.cached.sha256 == sha256:
                    state.cached, state.phase = None, "Pending"

    def prefetch(self, image: VmImage) -> None:
        """Start importing now (``prefetch: AllNodes``); errors show in the status, not here."""
        with contextlib.suppress(ImageNotReadyError):
            self.ensure(image)

    def known_spec_keys(self, live: list[VmImage]) -> set[str]:
        """The spec keys of live VmImages' states; states of VmImages gone are dropped."""
        wanted = {(i.metadata.namespace or "", i.metadata.name) for i in live}
        with self._lock:
            # An import in flight stays: its VmImage may be newer than the caller's list.
            for key in [k for k, st in self._states.items() if k not in wanted and not st.running]:
                del self._states[key]
            return {s.spec_key for s in self._states.values() if s.spec_key}

    def _fail_now(self, image: VmImage, key: Key, exc: ImageRefusedError | FetchError) -> None:
        with self._lock:
            state = self._states.get(key)
            already = state is not None and state.phase == "Failed" and state.message == str(exc)
            self._states[key] = _State(
                spec_key="", phase="Failed", reason=exc.reason, message=str(exc), failed_at=time.monotonic()
            )
        if not already:
            self._safe_report(image, "Failed", str(exc), VmImageStatus(progress=""))

    def _set(self, key: Key, wanted: str, **changes: Any) -> bool:
        with self._lock:
            state = self._states.get(key)
            if state is None or state.spec_key != wanted:
                return False  # the spec changed meanwhile: this import's result is not wanted
            for name, value in changes.items():
                setattr(state, name, value)
            return True

    def _credentials(self, image: VmImage) -> str | None:
        """What the controller sealed for this node, as far as the image tells."""
        return next((c.data for c in image.status.credentials if c.node == self.node), None)

    def _mark_interrupted(self, state: _State, attempts: int) -> None:
        """The agent died during this import last time, perhaps because of it: failed, and
        tried again only after a delay that doubles with each such death, never in a loop."""
        state.phase, state.reason = "Failed", "ImportInterrupted"
        state.retry_after = min(self.retry_seconds * 2 ** (attempts - 1), INTERRUPTED_RETRY_MAX)
        state.message = (
            f"the agent stopped during {attempts} import(s) of this image in a row (the image may be "
            f"what stopped it); trying again in {state.retry_after:.0f}s"
        )
        state.failed_at = time.monotonic()
        state.attempts = attempts + 1

    def _safe_report(
        self, image: VmImage, phase: ImagePhase, message: str | None, details: VmImageStatus
    ) -> None:
        """Queued for the reporter thread: an import never waits on the API."""
        key = (image.metadata.namespace or "", image.metadata.name)
        self._reporter.submit(key, image, phase, message, details)

    def _write_report(
        self, image: VmImage, phase: ImagePhase, message: str | None, details: VmImageStatus
    ) -> None:
        self.report(image, phase, message, details)

    def _import(self, image: VmImage, key: Key, wanted: str) -> None:
        with self._lock:
            state = self._states.get(key)
            attempts = state.attempts if state is not None else 1
        self.cache.begin_import(wanted, attempts)
        try:
            self._import_marked(image, key, wanted)
        finally:
            self.cache.end_import(wanted)

    def _import_marked(self, image: VmImage, key: Key, wanted: str) -> None:
        name = image.metadata.name
        started = time.monotonic()

        def progress(done: int, total: int | None) -> None:
            text = progress_text(done, total)
            self._set(key, wanted, phase="Downloading", progress=text)
            self._safe_report(image, "Downloading", None, VmImageStatus(progress=text))

        def phase(value: ImagePhase) -> None:
            self._set(key, wanted, phase=value)
            self._safe_report(image, value, None, VmImageStatus())

        try:
            self._set(key, wanted, phase="Downloading", reason="ImageDownloading", message="")
            fetched = self._fetch(image, Throttle(progress, self.progress_seconds))
            cached = import_fetched(fetched, _expectation(image), self.cache, self.limits, phase)
            self.cache.remember_spec(wanted, cached.sha256)
        except (ImageRefusedError, FetchError) as exc:
            metrics.IMAGE_IMPORTS.labels(exc.reason).inc()
            log.warning("VmImage %s/%s failed: %s", key[0], name, exc)
            if self._set(
                key,
                wanted,
                phase="Failed",
                reason=exc.reason,
                message=str(exc),
                failed_at=time.monotonic(),
                # Waiting for the controller to seal the credentials costs no download: look
                # again as soon as the image changes (its sealed credentials arrive).
                retry_after=WAITING_RETRY if exc.reason in WAITING_REASONS else 0.0,
                running=False,
                progress="",
            ):
                self._safe_report(image, "Failed", str(exc), VmImageStatus(progress=""))
        except Exception as exc:  # a bug or host problem: Failed with the error, retried later
            metrics.IMAGE_IMPORTS.labels("ImportError").inc()
            log.exception("VmImage %s/%s import crashed", key[0], name)
            if self._set(
                key,
                wanted,
                phase="Failed",
                reason="ImportError",
                message=str(exc),
                failed_at=time.monotonic(),
                retry_after=0.0,
                running=False,
                progress="",
            ):
                self._safe_report(image, "Failed", str(exc), VmImageStatus(progress=""))
        else:
            metrics.IMAGE_IMPORTS.labels("ready").inc()
            metrics.IMAGE_IMPORT_SECONDS.observe(time.monotonic() - started)
            metrics.IMAGE_BYTES.inc(fetched.size)
            log.info(
                "VmImage %s/%s ready in %.2fs: %s %s bytes",
                key[0],
                name,
                time.monotonic() - started,
                cached.format,
                cached.virtual_size,
            )
            if self._set(
                key,
                wanted,
                phase="Ready",
                cached=cached,
                running=False,
                progress="100%",
            ):
                self._safe_report(image, "Ready", None, _details(cached))
        if self.notify is not None:
            self.notify(key[0], name)

    def _fetch(self, image: VmImage, progress: fetch.Progress) -> fetch.Fetched:
        source = image.spec.source
        dest = self.cache.scratch_file("fetch")
        try:
            if source.http is not None:
                auth = self.authorization(image) if source.http.secret_ref is not None else None
                return fetch.download(source.http.url, dest, self.limits, progress, auth)
            return fetch.copy_local(host_path(image, self.layout), dest, self.limits, progress)
        except BaseException:
            dest.unlink(missing_ok=True)  # a partial download is worth nothing
            raise


def _expectation(image: VmImage) -> Expectation:
    return Expectation(format=image.spec.format, checksum=image.spec.checksum)


def _details(cached: BaseImage) -> VmImageStatus:
    return VmImageStatus(
        progress="100%", size=cached.size, virtual_size=cached.virtual_size, format=cached.format
    )
