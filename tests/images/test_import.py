"""NodeImages end to end on real files: a real HTTP server, real qemu-img, gzip, xz, tar.
The status reporter is the one stand-in: it records what would be written to the VmImage
(the control-plane tests check the real writes)."""

import base64
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from formation_vmm.agent.vms import files as vm_files
from formation_vmm.agent.vms.inputs import image_authorization
from formation_vmm.api.models import SealedValue, VmImage, VmImageStatus
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.spec import BaseImage, Owner
from formation_vmm.host.paths import remove_tree
from formation_vmm.host.qemu_img import info as disk_info
from formation_vmm.images.collector import GarbageCollector
from formation_vmm.images.egress import EgressPolicy
from formation_vmm.images.fetch import FetchLimits
from formation_vmm.images.node import ImageNotReadyError, NodeImages
from formation_vmm.sealing import NodeKey, image_context, key_id, seal
from tests.support import image_files as files
from tests.support.image_server import ImageServer, serve
from tests.support.waiting import wait_for

pytestmark = pytest.mark.host


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None, VmImageStatus]] = []
        self.changed = threading.Event()

    def __call__(self, image: VmImage, phase: str, message: str | None, details: VmImageStatus) -> None:
        self.calls.append((image.metadata.name, phase, message, details))

    def notify(self, namespace: str, name: str) -> None:
        self.changed.set()

    def phases(self, name: str) -> list[str]:
        return [c[1] for c in self.calls if c[0] == name]


@pytest.fixture
def content(tmp_path: Path) -> Path:
    root = tmp_path / "served"
    root.mkdir()
    return root


@pytest.fixture
def server(content: Path) -> Iterator[ImageServer]:
    with serve(content) as srv:
        yield srv


@pytest.fixture
def layout(tmp_path: Path) -> NodeLayout:
    return NodeLayout(
        vm_dir=tmp_path / "run",
        disks_dir=tmp_path / "disks",
        images_dir=tmp_path / "images",
        cache_dir=tmp_path / "image-cache",
    )


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def manager(layout: NodeLayout, recorder: Recorder, **kw: Any) -> NodeImages:
    """The node's image manager as the agent builds it: credentials come sealed for node-a."""
    key = NodeKey(layout.vm_dir.parent / "agent" / "node.key")
    limits = kw.pop("limits", loopback_limits())
    return NodeImages(
        "node-a", layout, limits, recorder, image_authorization(key, "node-a"), recorder.notify, **kw
    )


def loopback_limits(**kw: Any) -> FetchLimits:
    """The agent's limits with the egress policy opened for exactly the test server's address."""
    return FetchLimits(
        **{
            "max_bytes": 64 << 20,
            "read_timeout": 5,
            "egress": EgressPolicy.from_settings(["127.0.0.1/32"], None),
            **kw,
        }
    )


def vmimage(name: str, *, url: str | None = None, path: str | None = None, **spec: Any) -> VmImage:
    source: dict[str, Any] = {"http": {"url": url}} if url else {"hostPath": {"path": path}}
    if "secretRef" in spec:
        source["http"]["secretRef"] = spec.pop("secretRef")
    return VmImage.model_validate(
        {
            "metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
            "spec": {"source": source, **spec},
        }
    )


def resolve(images: NodeImages, image: VmImage, timeout: float = 30) -> BaseImage:
    """Ask like a VM's sync does, until the import is done; raise its failure."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return images.ensure(image)
        except ImageNotReadyError as exc:
            if exc.reason != "ImageDownloading":
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize(
    ("kind", "expected_format"),
    [
        ("raw", "raw"),
        ("qcow2", "qcow2"),
        ("vmdk", "qcow2"),
        ("gz", "qcow2"),
        ("xz", "raw"),
        ("form", "qcow2"),
    ],
)
def test_each_kind_of_file_becomes_a_verified_base(
    kind: str,
    expected_format: str,
    content: Path,
    server: ImageServer,
    layout: NodeLayout,
    recorder: Recorder,
) -> None:
    raw = files.raw(content / "src.raw")
    qcow = files.convert(raw, content / "src.qcow2", "qcow2")
    made = {
        "raw": raw,
        "qcow2": qcow,
        "vmdk": files.convert(raw, content / "src.vmdk", "vmdk"),
        "gz": files.gz(qcow, content / "src.qcow2.gz"),
        "xz": files.xz(raw, content / "src.img.xz"),
        "form": files.form(content / "src.form", qcow, "qcow2"),
    }[kind]
    # The name on the server says nothing: the format comes from the bytes.
    served = made.rename(content / f"image-{kind}.bin")
    images = manager(layout, recorder)
    base = resolve(
        images, vmimage("img", url=server.url(f"/files/{served.name}"), checksum=files.sha256(served))
    )
    assert base.format == expected_format
    assert base.virtual_size == 2 * files.MIB
    assert base.path.is_file() and base.path.parent == layout.cache_dir / "blobs"
    assert disk_info(base.path).format == expected_format
    if kind == "form":
        assert base.min_memory == "64Mi"
    assert recorder.phases("img")[-1] == "Ready"
    assert recorder.calls[-1][3].format == expected_format
    if kind == "vmdk":
        assert "Converting" in recorder.phases("img")
    # Nothing left in scratch.
    assert list((layout.cache_dir / "scratch").iterdir()) == []


def test_a_base_is_an_overlay_backing_and_the_overlay_reads_the_image(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder, tmp_path: Path
) -> None:
    raw = files.raw(content / "disk.raw")
    images = manager(layout, recorder)
    base = resolve(images, vmimage("img", url=server.url("/files/disk.raw")))
    overlay = layout.disk_path(Owner("ns", "vm", "uid-vm"), "root")
    started = time.monotonic()
    vm_files.create_overlay(layout.disks_dir, overlay, base, 8 * files.MIB)
    took = time.monotonic() - started
    info = disk_info(overlay)
    assert info.backing == str(base.path) and info.virtual_size == 8 * files.MIB
    # The overlay shows the image's bytes: convert it back to raw and look.
    out = tmp_path / "back.raw"
    files.qemu_img("convert", "-O", "raw", str(overlay), str(out))
    assert out.read_bytes()[: len(files.MARKER)] == files.MARKER
    assert took < 5, took  # not a timing test: a copy of the base would also pass; see bench/
    assert raw.stat().st_size == 2 * files.MIB


def test_checksum_mismatch_fails_and_is_retried_after_the_retry_period(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    files.raw(content / "disk.raw")
    images = manager(layout, recorder, retry_seconds=0.5)
    wrong = "sha256:" + "0" * 64
    image = vmimage("img", url=server.url("/files/disk.raw"), checksum=wrong)
    with pytest.raises(ImageNotReadyError) as err:
        resolve(images, image)
    assert err.value.reason == "ChecksumMismatch" and wrong in str(err.value)
    assert recorder.phases("img")[-1] == "Failed"
    assert recorder.changed.is_set()
    # Asked again within the retry period: the failure, without a new download.
    count = len(server.requests)
    with pytest.raises(ImageNotReadyError):
        images.ensure(image)
    assert len(server.requests) == count
    # The spec fixed: imported at once.
    fixed = vmimage("img", url=server.url("/files/disk.raw"), checksum=files.sha256(content / "disk.raw"))
    assert resolve(images, fixed).format == "raw"


@pytest.mark.parametrize(
    ("path", "reason", "words"),
    [
        ("/files/missing.img", "DownloadFailed", "HTTP 404"),
        ("/closing/disk.raw", "DownloadFailed", "closed"),
        ("/auth/disk.raw", "DownloadFailed", "HTTP 401"),
    ],
)
def test_server_failures_become_failed_with_the_cause(
    path: str,
    reason: str,
    words: str,
    content: Path,
    server: ImageServer,
    layout: NodeLayout,
    recorder: Recorder,
) -> None:
    files.raw(content / "disk.raw")
    images = manager(layout, recorder)
    with pytest.raises(ImageNotReadyError) as err:
        resolve(images, vmimage("img", url=server.url(path)))
    assert err.value.reason == reason
    assert words in str(err.value)
    assert recorder.calls[-1][1] == "Failed" and words in (recorder.calls[-1][2] or "")
    assert list((layout.cache_dir / "blobs").iterdir()) == []
    assert list((layout.cache_dir / "scratch").iterdir()) == []


def sealed_for(image: VmImage, node: str, public_b64: str, value: bytes) -> VmImage:
    """``image`` with its secretRef's value sealed for ``node``, as the controller writes it."""
    ref = image.spec.source.http.secret_ref  # type: ignore[union-attr]
    context = image_context("ns", image.metadata.name, image.metadata.uid or "", ref.name, ref.key)  # type: ignore[union-attr]
    entry = SealedValue(
        node=node, key_id=key_id(base64.b64decode(public_b64)), data=seal(public_b64, value, context)
    )
    return image.model_copy(update={"status": VmImageStatus(credentials=[entry])})


def test_secret_ref_sends_the_authorization_header_sealed_for_this_node(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    files.raw(content / "disk.raw")
    images = manager(layout, recorder)
    public = NodeKey(layout.vm_dir.parent / "agent" / "node.key").public_b64
    plain = vmimage("img", url=server.url("/auth/disk.raw"), secretRef={"name": "token"})
    with pytest.raises(ImageNotReadyError, match="waiting for the controller") as err:
        resolve(images, plain)
    assert err.value.reason == "SecretNotSealed" and server.requests == []
    assert resolve(images, sealed_for(plain, "node-a", public, b"Bearer s3cret")).format == "raw"
    assert server.headers[-1]["Authorization"] == "Bearer s3cret"
    # Sealed for another node's key, or for another image: it does not open here.
    other_key = NodeKey(layout.vm_dir.parent / "other" / "node.key").public_b64
    stolen = vmimage("other", url=server.url("/auth/disk.raw?other"), secretRef={"name": "token"})
    with pytest.raises(ImageNotReadyError, match="current key"):
        resolve(images, sealed_for(stolen, "node-a", other_key, b"Bearer s3cret"))
    copied = stolen.model_copy(
        update={"status": sealed_for(plain, "node-a", public, b"Bearer s3cret").status}
    )
    with pytest.raises(ImageNotReadyError, match="does not open"):
        resolve(images, copied)


def test_a_slow_download_reports_progress_along_the_way(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    files.raw(content / "disk.raw", size=1 * files.MIB)  # 16 chunks of 64 KiB, 0.25 s apart
    images = manager(layout, recorder, progress_seconds=0.5)
    resolve(images, vmimage("img", url=server.url("/slow/disk.raw")))
    progress = [c[3].progress for c in recorder.calls if c[1] == "Downloading"]
    assert len(progress) >= 3, progress
    assert len(progress) <= 12, progress  # throttled: not one write per chunk
    numbers = [int(p.rstrip("%")) for p in progress]
    assert numbers == sorted(numbers) and numbers[-1] == 100 and 0 < numbers[1] < 100


def test_a_stalled_server_times_out(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    files.raw(content / "disk.raw", size=1 * files.MIB)
    server.slow_delay = 2.0
    images = manager(layout, recorder, limits=loopback_limits(read_timeout=0.5))
    with pytest.raises(ImageNotReadyError, match="timed out"):
        resolve(images, vmimage("img", url=server.url("/slow/disk.raw")))


def test_an_image_over_the_size_limit_is_refused(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    files.raw(content / "disk.raw", size=4 * files.MIB)
    images = manager(layout, recorder, limits=loopback_limits(max_bytes=1 * files.MIB))
    with pytest.raises(ImageNotReadyError, match="limit") as err:
        resolve(images, vmimage("img", url=server.url("/files/disk.raw")))
    assert err.value.reason == "TooLarge"


def test_refused_images(content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder) -> None:
    raw = files.raw(content / "base.raw")
    files.with_backing(content / "backed.qcow2", raw)
    files.corrupt_qcow2(raw, content / "corrupt.qcow2")
    packed = files.gz(raw, content / "tmp.gz").read_bytes()
    (content / "broken.gz").write_bytes(packed[: len(packed) // 2])
    files.convert(raw, content / "plain.qcow2", "qcow2")
    images = manager(layout, recorder)
    cases = {
        "backed.qcow2": ("BackingFileRefused", "backing file"),
        "corrupt.qcow2": ("CorruptImage", "qemu-img"),
        "broken.gz": ("CorruptImage", "gzip"),
    }
    for name, (reason, words) in cases.items():
        with pytest.raises(ImageNotReadyError) as err:
            resolve(images, vmimage(name.replace(".", "-"), url=server.url(f"/files/{name}")))
        assert (err.value.reason, words in str(err.value)) == (reason, True), str(err.value)
    # A declared format is checked against the bytes.
    with pytest.raises(ImageNotReadyError) as err:
        resolve(images, vmimage("declared", url=server.url("/files/plain.qcow2"), format="raw"))
    assert err.value.reason == "FormatMismatch"


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("extra", "manifest_disk", "reason"),
    [
        ([_member("../escape")], "disk.img", "UnsafeBundle"),
        ([_member("/etc/evil")], "disk.img", "UnsafeBundle"),
        ([_member("link", tarfile.SYMTYPE, "/etc/shadow")], "disk.img", "UnsafeBundle"),
        ([_member("hard", tarfile.LNKTYPE, "disk.img")], "disk.img", "UnsafeBundle"),
        ([], "../disk.img", "UnsafeBundle"),
        ([], "other.img", "InvalidBundle"),
    ],
)
def test_form_bundles_with_unsafe_members_are_refused(
    extra: list[tarfile.TarInfo],
    manifest_disk: str,
    reason: str,
    content: Path,
    server: ImageServer,
    layout: NodeLayout,
    recorder: Recorder,
    tmp_path: Path,
) -> None:
    raw = files.raw(content / "disk.raw")
    manifest = {"formatVersion": 1, "disk": manifest_disk, "format": "raw"}
    files.form(content / "bad.form", raw, "raw", manifest=manifest, extra=extra)
    images = manager(layout, recorder)
    with pytest.raises(ImageNotReadyError) as err:
        resolve(images, vmimage("bad", url=server.url("/files/bad.form")))
    assert err.value.reason == reason, str(err.value)
    # Nothing was written outside the cache, and nothing stays in it.
    assert not (tmp_path / "escape").exists()
    assert list((layout.cache_dir / "scratch").iterdir()) == []


def test_host_path_images_stay_inside_the_images_directory(
    layout: NodeLayout, recorder: Recorder, tmp_path: Path
) -> None:
    layout.images_dir.mkdir(parents=True)
    files.raw(layout.images_dir / "ok.raw")
    outside = files.raw(tmp_path / "secret.raw")
    (layout.images_dir / "sneaky.raw").symlink_to(outside)
    images = manager(layout, recorder)
    assert resolve(images, vmimage("ok", path="ok.raw")).format == "raw"
    with pytest.raises(ImageNotReadyError) as err:
        resolve(images, vmimage("sneaky", path="sneaky.raw"))
    assert err.value.reason == "ImagePathRefused" and "outside" in str(err.value)
    with pytest.raises(ImageNotReadyError) as err:
        resolve(images, vmimage("gone", path="missing.raw"))
    assert err.value.reason == "ImageMissing"


def test_two_images_with_the_same_bytes_share_one_base_and_a_restart_finds_it(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    files.raw(content / "disk.raw")
    os.link(content / "disk.raw", content / "same.raw")
    images = manager(layout, recorder)
    one = resolve(images, vmimage("one", url=server.url("/files/disk.raw")))
    two = resolve(images, vmimage("two", url=server.url("/files/same.raw")))
    assert one.path == two.path
    assert len([p for p in (layout.cache_dir / "blobs").iterdir() if p.suffix == ".raw"]) == 1
    assert list((layout.cache_dir / "scratch").iterdir()) == []  # the second fetch is gone
    # A restarted agent (a new manager on the same directory) finds it without downloading.
    count = len(server.requests)
    again = manager(layout, Recorder())
    assert again.ensure(vmimage("one", url=server.url("/files/disk.raw"))).path == one.path
    assert len(server.requests) == count


def test_garbage_collection_keeps_what_is_referenced_and_removes_the_rest_after_the_grace(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    files.raw(content / "a.raw", marker=b"A")
    files.raw(content / "b.raw", marker=b"B")
    images = manager(layout, recorder)
    a = vmimage("a", url=server.url("/files/a.raw"))
    b = vmimage("b", url=server.url("/files/b.raw"))
    base_a, base_b = resolve(images, a), resolve(images, b)
    vm_files.create_overlay(
        layout.disks_dir, layout.disk_path(Owner("ns", "vm", "uid-vm"), "root"), base_b, None
    )
    gc = GarbageCollector(images, grace_seconds=10)
    # Both VmImages gone; b's base still backs a VM's overlay.
    assert gc.collect([], now=100.0) == []
    assert gc.collect([], now=105.0) == []
    assert gc.collect([], now=111.0) == [base_a.sha256]
    assert not base_a.path.exists() and base_b.path.exists()
    # The overlay gone too: b goes after its own grace period.
    remove_tree(layout.disks_dir, layout.disk_dir(Owner("ns", "vm", "uid-vm")))
    assert gc.collect([], now=112.0) == []
    assert gc.collect([], now=123.0) == [base_b.sha256]
    # A live VmImage keeps its base forever.
    base_c = resolve(images, vmimage("c", url=server.url("/files/a.raw")))
    assert gc.collect([vmimage("c", url=server.url("/files/a.raw"))], now=1e9) == []
    assert base_c.path.exists()


def test_a_cache_past_its_cap_loses_unused_bases_and_takes_no_import_while_full(
    content: Path, server: ImageServer, layout: NodeLayout, recorder: Recorder
) -> None:
    """The admin's cap on a node's image cache (issue 26, finding 11): past it, the collector
    removes bases no VM disk uses (oldest first, a live VmImage's too: it is fetched again when
    needed), never one under a VM's disk; while the bases in use fill it, no import starts and
    the VmImage says why on this node."""
    for name in ("a", "b", "c"):
        files.raw(content / f"{name}.raw", marker=name.encode())
    images = manager(layout, recorder)
    a, b, c = (vmimage(n, url=server.url(f"/files/{n}.raw")) for n in ("a", "b", "c"))
    base_a = resolve(images, a)
    base_b = resolve(images, b)
    vm_files.create_overlay(
        layout.disks_dir, layout.disk_path(Owner("ns", "vm", "uid-vm"), "root"), base_b, None
    )
    one = base_a.path.stat().st_size
    # Room for the two bases and their metadata, not a third.
    cap = sum(p.stat().st_size for p in (layout.cache_dir / "blobs").iterdir()) + one // 2
    images.max_cache_bytes = cap
    gc = GarbageCollector(images, grace_seconds=3600, max_bytes=cap)
    assert gc.collect([a, b], now=1.0) == []  # within the cap: both stay, both VmImages live
    base_c = resolve(images, c)  # past the cap now
    assert gc.collect([a, b, c], now=2.0) == [base_a.sha256]  # the oldest base no disk uses
    assert base_b.path.exists() and base_c.path.exists()
    # The VmImage whose base went is fetched again when asked for.
    fetched = len(server.requests)
    again = resolve(images, a)
    assert again.sha256 == base_a.sha256 and len(server.requests) > fetched
    # Now every base backs a disk, and they fill the cap: no import starts, and the status says so.
    for image, base in ((c, base_c), (a, again)):
        vm_files.create_overlay(
            layout.disks_dir,
            layout.disk_path(Owner("ns", f"vm-{image.metadata.name}", "u"), "root"),
            base,
            None,
        )
    files.raw(content / "d.raw", marker=b"d")
    d = vmimage("d", url=server.url("/files/d.raw"))
    with pytest.raises(ImageNotReadyError) as refused:
        images.ensure(d)
    assert refused.value.reason == "ImageCacheFull"
    assert "image_cache_max_bytes" in str(refused.value)
    wait_for(lambda: recorder.phases("d") == ["Failed"], 10, "the VmImage's status on this node")
    assert gc.collect([a, b, c, d], now=3.0) == []  # nothing it may remove
