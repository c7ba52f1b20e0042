"""Images made to attack the agent, imported for real (a real HTTP server on loopback, the real
qemu-img in its sandbox, the node's real image cache): each is refused with a reason, nothing of
the node's files reaches the cache, and the agent's memory stays flat."""

import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from formation_vmm.api.models import VmImage
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.host import sandbox
from formation_vmm.host.qemu_img import QemuImgError
from formation_vmm.images.cache import ImageCache
from formation_vmm.images.egress import EgressPolicy
from formation_vmm.images.fetch import FetchLimits
from formation_vmm.images.node import ImageNotReadyError, NodeImages, spec_key
from tests.support import image_files as files
from tests.support.image_server import ImageServer, serve
from tests.support.waiting import wait_for

pytestmark = pytest.mark.host

# What a service account token looks like to an image: a file of the node the agent can read.
TOKEN = b"eyJhbGciOiJSUzI1NiJ9.the-agents-service-account-token.signature"


@pytest.fixture(scope="module")
def node_secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    secret = tmp_path_factory.mktemp("node-files") / "token"
    secret.write_bytes(TOKEN * 64)  # 4 KiB, a whole number of 512-byte sectors
    secret.chmod(0o600)
    return secret


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, node_secret: Path) -> Iterator[ImageServer]:
    root = tmp_path_factory.mktemp("served")
    files.vmdk_pointing_at(root / "extent-at-token.vmdk", node_secret)
    files.vmdk_split(root / "split.vmdk")
    files.qcow2_with_data_file(root / "data-file.qcow2", node_secret)
    files.qcow2_with_json_backing(root / "json-backing.qcow2")
    files.with_backing(root / "backing.qcow2", node_secret)
    files.xz_bomb(root / "bomb.xz")
    files.tar_gz_with_members(root / "million.tar.gz", 1_000_000)
    files.gz(files.qcow2_spinner(root / "spinner.qcow2"), root / "spinner.qcow2.gz")
    with serve(root) as server:
        yield server


def node_images(
    tmp_path: Path, retry_seconds: float = 3600, **limits: Any
) -> tuple[NodeImages, NodeLayout, list[tuple[str, str, str | None]]]:
    layout = NodeLayout(
        vm_dir=tmp_path / "run",
        disks_dir=tmp_path / "disks",
        images_dir=tmp_path / "images",
        cache_dir=tmp_path / "image-cache",
    )
    calls: list[tuple[str, str, str | None]] = []

    def report(image: VmImage, phase: str, message: str | None, details: object) -> None:
        calls.append((image.metadata.name, phase, message))

    def no_secrets(namespace: str, secret: str, key: str) -> str:
        raise AssertionError("no image here has a secretRef")

    fetch = FetchLimits(
        **{"max_bytes": 64 << 20, "egress": EgressPolicy.from_settings(["127.0.0.1/32"], None), **limits}
    )
    return NodeImages("node-a", layout, fetch, report, no_secrets, retry_seconds=retry_seconds), layout, calls


def vmimage(name: str, url: str, fmt: str = "auto") -> VmImage:
    return VmImage.model_validate(
        {
            "metadata": {"name": name, "namespace": "tenant", "uid": f"uid-{name}"},
            "spec": {"source": {"http": {"url": url}}, "format": fmt},
        }
    )


def refusal(images: NodeImages, image: VmImage, timeout: float = 60) -> ImageNotReadyError:
    deadline = time.monotonic() + timeout
    while True:
        try:
            images.ensure(image)
        except ImageNotReadyError as exc:
            if exc.reason != "ImageDownloading":
                return exc
        else:
            raise AssertionError(f"VmImage {image.metadata.name} was accepted")
        assert time.monotonic() < deadline, "the import did not end"
        time.sleep(0.05)


def cache_holds(layout: NodeLayout, needle: bytes) -> list[Path]:
    return [p for p in layout.cache_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.parametrize(
    ("name", "fmt", "reason"),
    [
        ("extent-at-token.vmdk", "auto", "ExternalExtentRefused"),
        ("extent-at-token.vmdk", "vmdk", "ExternalExtentRefused"),
        ("split.vmdk", "auto", "ExternalExtentRefused"),
        ("data-file.qcow2", "auto", "ExternalDataRefused"),
        ("json-backing.qcow2", "auto", "BackingFileRefused"),
        ("backing.qcow2", "qcow2", "BackingFileRefused"),
    ],
)
def test_an_image_whose_metadata_points_outside_itself_is_refused(
    served: ImageServer, tmp_path: Path, name: str, fmt: str, reason: str
) -> None:
    images, layout, calls = node_images(tmp_path)
    try:
        err = refusal(images, vmimage("attack", served.url(f"/files/{name}"), fmt))
        assert err.reason == reason, str(err)
        wait_for(lambda: calls and calls[-1][1] == "Failed", 10, "the Failed report")
        assert cache_holds(layout, TOKEN[:32]) == []  # not one byte of the node's file
        assert list((layout.cache_dir / "blobs").iterdir()) == []
        assert list((layout.cache_dir / "scratch").iterdir()) == []
    finally:
        images.close()


def test_qemu_img_reads_nothing_it_was_not_handed(
    served: ImageServer, tmp_path: Path, node_secret: Path
) -> None:
    """Without the inspector, the sandbox alone: qemu-img handed the descriptor whose extent is
    the token cannot open the token, and cannot write next to it."""
    descriptor = tmp_path / "d.vmdk"
    files.vmdk_pointing_at(descriptor, node_secret)
    with pytest.raises(QemuImgError, match="Permission denied"):
        sandbox.run(
            ["info", "--output=json", "-f", "vmdk", str(descriptor)], [descriptor], None, sandbox.Limits()
        )
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(QemuImgError, match="Permission denied"):
        sandbox.run(
            ["convert", "-f", "raw", "-O", "raw", str(node_secret), str(scratch / "copy.raw")],
            [descriptor],
            scratch,
            sandbox.Limits(file_size=1 << 20),
        )
    assert list(scratch.iterdir()) == []


def test_bombs_fail_their_image_and_the_agents_memory_stays_flat(served: ImageServer, tmp_path: Path) -> None:
    images, layout, _ = node_images(tmp_path, max_bytes=1 << 30, qemu_img_cpu_seconds=2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    try:
        xz = refusal(images, vmimage("xz-bomb", served.url("/files/bomb.xz")))
        assert xz.reason == "DecompressionBomb", str(xz)
        tar = refusal(images, vmimage("many", served.url("/files/million.tar.gz")))
        assert (tar.reason, str(tar)) == ("UnsafeBundle", "VmImage many: the bundle has more than 16 members")
        spinner = refusal(images, vmimage("spinner", served.url("/files/spinner.qcow2.gz")), timeout=120)
        assert spinner.reason == "CorruptImage"
        assert "SIGXCPU" in str(spinner), str(spinner)  # its CPU-time limit, not a wait
    finally:
        images.close()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 64 << 10, f"the agent's peak memory grew by {grown} KiB"
    assert list((layout.cache_dir / "scratch").iterdir()) == []


def test_an_import_the_agent_died_in_is_not_retried_in_a_loop(served: ImageServer, tmp_path: Path) -> None:
    image = vmimage("deadly", served.url("/files/bomb.xz"))
    images, layout, _ = node_images(tmp_path)
    key = spec_key(image, layout)
    images.close()
    # The state a killed agent leaves: the marker of the import it was in, twice in a row.
    cache = ImageCache(layout.cache_dir)
    cache.setup()
    cache.begin_import(key, 2)
    requests = len(served.requests)
    again, _, _ = node_images(tmp_path, retry_seconds=60)
    try:
        err = refusal(again, image)
        assert err.reason == "ImportInterrupted"
        assert "2 import(s) of this image in a row" in str(err)
        assert "trying again in 120s" in str(err)  # the retry delay, doubled per death
        assert len(served.requests) == requests  # nothing was fetched: no loop
        assert refusal(again, image).reason == "ImportInterrupted"  # asked again: still waiting
        assert len(served.requests) == requests
    finally:
        again.close()
