"""The pod sandbox ("pause") image of the test node, built here: no registry is reachable, so
containerd cannot pull registry.k8s.io/pause. A static Go program that does what Kubernetes'
pause does (hold the pod's namespaces, reap orphans, exit on SIGINT or SIGTERM), in a one-layer
OCI image written by umoci and packed by skopeo. Cached by its source, like the other images."""

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from formation_vmm.devcluster.operator_image import cache_dir

NAME = "localhost/formation-vmm/pause:1"
SOURCE = """// The pod sandbox: holds the pod's namespaces until the pod ends.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
"""


def _run(*argv: str, **kwargs: object) -> None:
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]  # noqa: S603


def archive_path() -> Path:
    digest = hashlib.sha256((SOURCE + NAME).encode()).hexdigest()[:16]
    return cache_dir() / f"pause-{digest}.oci.tar"


def build() -> Path:
    dest = archive_path()
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pause-", dir=dest.parent) as scratch:
        work = Path(scratch)
        (work / "src").mkdir()
        (work / "src" / "go.mod").write_text("module formation.cloud/pause\n\ngo 1.22\n")
        (work / "src" / "main.go").write_text(SOURCE)
        root = work / "rootfs"
        root.mkdir()
        go = shutil.which("go") or "/usr/local/go/bin/go"
        env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-buildvcs=false"}
        _run(
            go,
            "build",
            "-trimpath",
            "-ldflags",
            "-s -w",
            "-o",
            str(root / "pause"),
            ".",
            cwd=work / "src",
            env=env,
        )
        layout = work / "oci"
        ref = f"{layout}:pause"
        _run("umoci", "init", "--layout", str(layout))
        _run("umoci", "new", "--image", ref)
        _run("umoci", "insert", "--image", ref, "--no-history", str(root / "pause"), "/pause")
        _run(
            "umoci",
            "config",
            "--image",
            ref,
            "--config.entrypoint=/pause",
            "--config.user=65535:65535",
            "--no-history",
        )
        partial = work / "pause.oci.tar"
        _run("skopeo", "copy", "--quiet", f"oci:{ref}", f"oci-archive:{partial}:{NAME}")
        partial.rename(dest)
    return dest
