"""The image cache's garbage collector: bases no VmImage and no VM disk refers to go after a
grace period, and past the admin's cap, unused bases go oldest first."""

import logging
import time

from formation_vmm import metrics
from formation_vmm.api.models import VmImage
from formation_vmm.images.fetch import FetchError
from formation_vmm.images.formats import ImageRefusedError
from formation_vmm.images.node import NodeImages, spec_key
from formation_vmm.images.overlays import backs, mtime_of, overlay_bases, size_of

log = logging.getLogger(__name__)


class GarbageCollector:
    """Removes cached bases no VmImage and no VM overlay refers to, ``grace`` seconds after
    they were first seen unreferenced (a VmImage deleted and re-created meanwhile keeps its
    base). The clock is this process's: a restarted agent waits a full grace period again.

    With ``max_bytes`` (the admin's cap on this node's cache, ``image_cache_max_bytes``), a
    cache past it loses bases no VM overlay on the node uses, least recently stored first, live
    VmImage or not, grace or not: a VmImage whose base went is fetched again when a VM needs
    it. Bases under a VM's disk are never removed (the disk would be lost)."""

    def __init__(self, images: NodeImages, grace_seconds: float, max_bytes: int = 0) -> None:
        self.images = images
        self.grace = grace_seconds
        self.max_bytes = max_bytes
        self._unreferenced_since: dict[str, float] = {}

    def collect(self, live: list[VmImage], now: float | None = None) -> list[str]:
        """Returns the content hashes removed."""
        metrics.IMAGE_GC_RUNS.inc()
        images = self.images
        cache = images.cache
        if not cache.root.is_dir():
            return []
        moment = time.monotonic() if now is None else now
        keys = set()
        for image in live:
            try:
                keys.add(spec_key(image, images.layout))
            except (ImageRefusedError, FetchError, OSError):
                continue
        keys |= images.known_spec_keys(live)
        for key in cache.spec_keys():
            if key not in keys:
                cache.forget_spec(key)
        referenced = {sha for sha in (cache.recalled_sha(k) for k in cache.spec_keys()) if sha}
        bases = overlay_bases(images.layout.disks_dir)
        removed = []
        for sha, paths in cache.blobs_on_disk().items():
            if sha in referenced or backs(paths, bases):
                self._unreferenced_since.pop(sha, None)
                continue
            since = self._unreferenced_since.setdefault(sha, moment)
            if moment - since >= self.grace:
                for path in paths:
                    path.unlink(missing_ok=True)
                self._unreferenced_since.pop(sha, None)
                removed.append(sha)
                metrics.IMAGE_CACHE_REMOVED.inc()
                log.info("removed cached image %s: unreferenced for %.0fs", sha[:12], moment - since)
        if self.max_bytes:
            removed += self._evict(bases)
        return removed

    def _evict(self, bases: set[str]) -> list[str]:
        """Unused bases out, oldest first, until the cache is within its cap."""
        cache = self.images.cache
        blobs = cache.blobs_on_disk()
        total = sum(size_of(p) for paths in blobs.values() for p in paths)
        unused = [
            (min(mtime_of(p) for p in paths), sha, paths)
            for sha, paths in blobs.items()
            if not backs(paths, bases)
        ]
        removed = []
        for _, sha, paths in sorted(unused):
            if total <= self.max_bytes:
                break
            for key in cache.spec_keys():
                if cache.recalled_sha(key) == sha:
                    cache.forget_spec(key)
            for path in paths:
                total -= size_of(path)
                path.unlink(missing_ok=True)
            self.images.forget_base(sha)
            self._unreferenced_since.pop(sha, None)
            removed.append(sha)
            metrics.IMAGE_CACHE_REMOVED.inc()
            log.info(
                "removed cached image %s: the cache is past its cap of %d bytes", sha[:12], self.max_bytes
            )
        return removed
