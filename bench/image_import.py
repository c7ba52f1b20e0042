"""Image import throughput: the agent's import (stream, sha256, qemu-img info/check, fsync,
rename into the cache) against a plain `curl -o` of the same file from the same local server.

    .venv/bin/python -m bench.image_import --size-mib 512 --runs 3

Both read from one Python HTTP server on 127.0.0.1, so the server's speed bounds both alike.
"""

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from formation_vmm.api.models import VmImage
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.images.fetch import FetchLimits
from formation_vmm.images.node import ImageNotReadyError, NodeImages


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


def make_files(root: Path, size_mib: int) -> dict[str, Path]:
    raw = root / "disk.raw"
    with raw.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    qcow = root / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow)], check=True)
    return {"raw": raw, "qcow2": qcow}


def ours(url: str, work: Path) -> float:
    """Seconds from the first ensure() to the cached base, on an empty cache."""
    layout = NodeLayout(
        vm_dir=work / "run", disks_dir=work / "disks", images_dir=work / "images", cache_dir=work / "cache"
    )
    images = NodeImages(
        "bench", layout, FetchLimits(max_bytes=1 << 40), lambda *a: None, lambda *a: "", progress_seconds=3.0
    )
    image = VmImage.model_validate(
        {
            "metadata": {"name": "img", "namespace": "bench", "uid": "u"},
            "spec": {"source": {"http": {"url": url}}},
        }
    )
    started = time.monotonic()
    while True:
        try:
            images.ensure(image)
            break
        except ImageNotReadyError as exc:
            if exc.reason != "ImageDownloading":
                raise
            time.sleep(0.01)
    took = time.monotonic() - started
    images.close()
    shutil.rmtree(work)
    return took


def curl(url: str, work: Path) -> float:
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    subprocess.run(["curl", "-sSf", "-o", str(work / "out"), url], check=True)
    took = time.monotonic() - started
    shutil.rmtree(work)
    return took


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vmm-bench-images-"))
    try:
        served = root / "served"
        served.mkdir()
        made = make_files(served, args.size_mib)
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(served)))
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        port = httpd.server_address[1]
        print(
            f"machine: {len(os.sched_getaffinity(0))} cores; {args.runs} runs each, medians; "
            "files of random bytes"
        )
        for kind, path in made.items():
            size = path.stat().st_size / 1e6
            url = f"http://127.0.0.1:{port}/{path.name}"
            t_curl = statistics.median(curl(url, root / f"curl-{i}") for i in range(args.runs))
            t_ours = statistics.median(ours(url, root / f"ours-{i}") for i in range(args.runs))
            print(
                f"{kind:6} {size:8.1f} MB   curl {size / t_curl:7.1f} MB/s ({t_curl:.2f} s)   "
                f"agent import {size / t_ours:7.1f} MB/s ({t_ours:.2f} s)   ratio {t_curl / t_ours:.2f}"
            )
        httpd.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
