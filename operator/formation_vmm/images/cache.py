"""The node's image cache: one file per distinct content, named by the sha256 of the bytes as
fetched, so two VmImages with the same bytes share one base. Every file arrives under a scratch
name, is fsync'd and renamed into place: a crash leaves scratch files, never a half base.

The cache lives in a directory of its own (``VMM_IMAGE_CACHE_DIR``), never under the hostPath
images directory, so no VmImage can name cached bytes. Directories are 0711 (QEMU, which may run
as its own user, traverses them; nobody lists them), bases 0444."""

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from formation_vmm.domain.spec import BaseImage
from formation_vmm.host.atomic import fsync_dir
from formation_vmm.host.paths import ensure_inside


class ImageCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.specs = root / "specs"
        self.scratch = root / "scratch"
        # One file per import under way: one found at start is an import the agent died in.
        self.importing = root / "importing"

    def setup(self) -> None:
        """Create the directories and drop scratch files a killed import left behind."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o711)
        for path in (self.blobs, self.specs, self.scratch, self.importing):
            path.mkdir(exist_ok=True, mode=0o711)
            ensure_inside(self.root, path)
        self.scratch.chmod(0o700)  # tenant bytes before they are checked: root only
        for leftover in self.scratch.iterdir():
            if leftover.is_file() or leftover.is_symlink():
                leftover.unlink()

    def interrupted(self) -> dict[str, int]:
        """Imports an earlier process started and never finished (spec key -> how many times in
        a row), as the markers it left say."""
        found = {}
        for marker in self.importing.iterdir() if self.importing.is_dir() else []:
            try:
                found[marker.name] = int(json.loads(marker.read_text()).get("attempts", 1))
            except (OSError, ValueError, AttributeError):
                found[marker.name] = 1
        return found

    def begin_import(self, key: str, attempts: int) -> None:
        self._write_json(self.importing / key, {"pid": os.getpid(), "attempts": attempts})

    def end_import(self, key: str) -> None:
        (self.importing / key).unlink(missing_ok=True)

    def scratch_file(self, label: str) -> Path:
        return self.scratch / f"{label}.{os.getpid()}.{time.monotonic_ns()}"

    def _meta_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.json"

    def lookup(self, sha256: str) -> BaseImage | None:
        try:
            data: Any = json.loads(self._meta_path(sha256).read_text())
            image = BaseImage(**{**data, "path": Path(data["path"])})
        except (OSError, ValueError, TypeError):
            return None
        return image if image.path.is_file() else None

    def store(self, sha256: str, file: Path, image: BaseImage) -> BaseImage:
        """Move ``file`` (a scratch file) into the cache as the base for ``sha256``."""
        final = self.blobs / f"{sha256}.{image.format}"
        with file.open("rb") as f:
            os.fsync(f.fileno())
        os.chmod(file, 0o444)  # a base is only ever read: overlays take the writes
        os.replace(file, final)
        stored = BaseImage(**{**asdict(image), "path": final, "sha256": sha256})
        self._write_json(self._meta_path(sha256), {**asdict(stored), "path": str(final)})
        fsync_dir(self.blobs)
        return stored

    def remember_spec(self, key: str, sha256: str) -> None:
        """Which content a VmImage spec resolved to, so a restarted agent finds it again."""
        self._write_json(self.specs / key, {"sha256": sha256})

    def recalled_sha(self, key: str) -> str | None:
        try:
            return str(json.loads((self.specs / key).read_text())["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def recall_spec(self, key: str) -> BaseImage | None:
        sha = self.recalled_sha(key)
        return self.lookup(sha) if sha else None

    def forget_spec(self, key: str) -> None:
        (self.specs / key).unlink(missing_ok=True)

    def _write_json(self, path: Path, data: dict[str, Any]) -> None:
        tmp = self.scratch_file(path.name)
        with tmp.open("w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def spec_keys(self) -> list[str]:
        return [p.name for p in self.specs.iterdir()] if self.specs.is_dir() else []

    def blobs_on_disk(self) -> dict[str, list[Path]]:
        """Every cached content hash with its files (base and metadata)."""
        found: dict[str, list[Path]] = {}
        if not self.blobs.is_dir():
            return found
        for path in self.blobs.iterdir():
            found.setdefault(path.name.split(".", 1)[0], []).append(path)
        return found
