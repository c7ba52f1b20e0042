"""VmImages end to end: the agents of the fleet import from a real HTTP server in this process,
VMs boot from qcow2 overlays on the cached bases, failures show on the image and its VMs, and an
image in use cannot be deleted from under them."""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from formation_vmm.host.qemu_img import info as disk_info
from tests.support import image_files as files
from tests.support.fleet import Fleet, condition
from tests.support.image_server import ImageServer, serve
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane

ON_A = {"zone": "a"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    root = tmp_path_factory.mktemp("served")
    raw = files.raw(root / "disk.raw")
    files.convert(raw, root / "disk.qcow2", "qcow2")
    files.raw(root / "slow.raw", size=2 * files.MIB, marker=b"slow")
    with serve(root) as srv:
        yield srv


def apply_image(fleet: Fleet, namespace: str, name: str, url: str, **spec: Any) -> None:
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VmImage",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"source": {"http": {"url": url}}, **spec},
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))


def apply_image_vm(fleet: Fleet, namespace: str, name: str, image_name: str, zone: str = "a") -> None:
    """A small VM in ``zone`` whose root disk is an overlay on VmImage ``image_name``."""
    fleet.apply_vm(
        namespace,
        name,
        cpus=1,
        memory="64Mi",
        nodeSelector={"zone": zone},
        disks=[{"name": "root", "image": image_name}],
    )


def image(fleet: Fleet, namespace: str, name: str) -> dict[str, Any]:
    return get_json(fleet.kubectl, "vmimg", name, "-n", namespace)


def wait_image(
    fleet: Fleet, namespace: str, name: str, check: Any, what: str, timeout: float = 60
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = image(fleet, namespace, name)
        return found if check(found) else None

    return wait_for(probe, timeout, f"VmImage {name} {what}")  # type: ignore[no-any-return]


def test_a_vm_boots_from_an_http_image_on_an_overlay_that_grows(
    fleet: Fleet, ns: str, server: ImageServer
) -> None:
    qcow = server.root / "disk.qcow2"
    apply_image(fleet, ns, "debian", server.url("/files/disk.qcow2"), checksum=files.sha256(qcow))
    apply_image_vm(fleet, ns, "web", "debian")
    vm = fleet.wait_phase(ns, "web", "Running")
    assert condition(vm, "ImageReady")["status"] == "True"
    img = wait_image(fleet, ns, "debian", lambda i: i.get("status", {}).get("phase") == "Ready", "Ready")
    status = img["status"]
    assert (
        status["format"] == "qcow2"
        and status["virtualSize"] == 2 * files.MIB
        and status["progress"] == "100%"
    )
    assert {"name": "node-a", "phase": "Ready"} in status["nodes"]
    assert condition(img, "Ready")["status"] == "True"
    # The disk is an overlay on the node's cached base, which lies in that node's images dir.
    overlay = fleet.vm_disk("node-a", ns, "web", "root")
    info = disk_info(overlay)
    assert info.format == "qcow2" and info.backing is not None
    assert Path(info.backing).parent == fleet.node_dir("node-a") / "image-cache" / "blobs"
    assert info.virtual_size == 2 * files.MIB
    # Growing size grows the disk (offline here: test:/// holds no file open) with no restart.
    fleet.kubectl(
        "patch",
        "vm",
        "web",
        "-n",
        ns,
        "--type=json",
        "-p",
        json.dumps([{"op": "add", "path": "/spec/disks/0/size", "value": "8Mi"}]),
    )
    wait_for(lambda: disk_info(overlay).virtual_size == 8 * files.MIB, 30, "the disk to grow to 8Mi")
    vm = fleet.vm(ns, "web")
    assert vm["status"]["phase"] == "Running" and condition(vm, "RestartRequired")["status"] == "False"
    exported = fleet.scrape(fleet.agents["node-a"])
    assert 'vmm_agent_image_imports_total{result="ready"}' in exported
    assert "vmm_agent_image_import_seconds_count" in exported
    # The replaced service's /images endpoint lists the cached base with what the import found.
    listed = fleet.agent_get("node-a", "/images")
    sha = files.sha256(qcow)[len("sha256:") :]
    assert {"format": "qcow2", "sha256": sha, "virtualSize": 2 * files.MIB}.items() <= next(
        e for e in listed if e.get("sha256") == sha
    ).items()


def test_a_failed_image_shows_on_the_image_and_its_vms_and_they_start_once_it_is_fixed(
    fleet: Fleet, ns: str, server: ImageServer
) -> None:
    apply_image(fleet, ns, "broken", server.url("/files/nothing-here.img"))
    for name in ("one", "two"):
        apply_image_vm(fleet, ns, name, "broken")
    for name in ("one", "two"):
        vm = fleet.wait_vm(
            ns,
            name,
            lambda v: condition(v, "ImageReady").get("reason") == "DownloadFailed",
            "ImageReady=False",
        )
        assert vm["status"]["phase"] == "Provisioning"
        assert "HTTP 404" in condition(vm, "ImageReady")["message"]
    img = wait_image(fleet, ns, "broken", lambda i: i.get("status", {}).get("phase") == "Failed", "Failed")
    entry = next(n for n in img["status"]["nodes"] if n["name"] == "node-a")
    assert entry["phase"] == "Failed" and "HTTP 404" in entry["message"]
    events = fleet.kubectl(
        "get", "events", "-n", ns, "--field-selector", "involvedObject.name=one", "-o", "json"
    )
    assert any("HTTP 404" in e["message"] for e in json.loads(events)["items"])
    # Fixed: the VMs go on their own.
    apply_image(fleet, ns, "broken", server.url("/files/disk.raw"))
    for name in ("one", "two"):
        fleet.wait_phase(ns, name, "Running")
    wait_image(
        fleet, ns, "broken", lambda i: i.get("status", {}).get("phase") == "Ready", "Ready after the fix"
    )


def test_two_vms_and_two_images_with_the_same_bytes_share_one_base(
    fleet: Fleet, ns: str, server: ImageServer
) -> None:
    apply_image(fleet, ns, "first", server.url("/files/disk.raw"))
    apply_image(fleet, ns, "second", server.url("/files/disk.raw?copy=2"))
    apply_image_vm(fleet, ns, "vm-x", "first", zone="b")
    apply_image_vm(fleet, ns, "vm-y", "second", zone="b")
    fleet.wait_phase(ns, "vm-x", "Running")
    fleet.wait_phase(ns, "vm-y", "Running")
    bases = {disk_info(fleet.vm_disk("node-b", ns, vm, "root")).backing for vm in ("vm-x", "vm-y")}
    assert len(bases) == 1
    blobs = fleet.node_dir("node-b") / "image-cache" / "blobs"
    assert len(list(blobs.glob(f"{files.sha256(server.root / 'disk.raw')[7:]}.*"))) == 2  # base + metadata
    assert list((blobs.parent / "scratch").iterdir()) == []  # the second download was dropped


def test_an_image_in_use_is_deleted_only_after_its_vms(fleet: Fleet, ns: str, server: ImageServer) -> None:
    apply_image(fleet, ns, "held", server.url("/files/disk.raw"))
    apply_image_vm(fleet, ns, "user", "held")
    fleet.wait_phase(ns, "user", "Running")
    wait_image(
        fleet,
        ns,
        "held",
        lambda i: "vmm.formation.cloud/image-in-use" in i["metadata"].get("finalizers", []),
        "the controller's finalizer",
    )
    fleet.kubectl("delete", "vmimg", "held", "-n", ns, "--wait=false")
    img = wait_image(fleet, ns, "held", lambda i: condition(i, "InUse").get("status") == "True", "InUse")
    assert "user" in condition(img, "InUse")["message"]
    # The image's deletion has been seen by the agent too (it resynced since): the VM is untouched.
    agent = fleet.agents["node-a"]
    fleet.wait_metric_above(agent, "vmm_agent_resyncs_total", fleet.metrics(agent)["vmm_agent_resyncs_total"])
    assert fleet.vm(ns, "user")["status"]["phase"] == "Running"
    fleet.kubectl("delete", "vm", "user", "-n", ns, "--wait=true", "--timeout=60s")
    fleet.wait_gone("vmimg", ns, "held", 30)


def test_prefetch_all_nodes_imports_on_every_hypervisor_with_progress(
    fleet: Fleet, ns: str, server: ImageServer
) -> None:
    apply_image(fleet, ns, "everywhere", server.url("/slow/slow.raw"), prefetch="AllNodes")
    seen: set[str] = set()

    def all_ready() -> bool:
        status = image(fleet, ns, "everywhere").get("status", {})
        if status.get("progress"):
            seen.add(status["progress"])
        names = {n["name"] for n in status.get("nodes", []) if n["phase"] == "Ready"}
        return names == {"node-a", "node-b", "node-q"}

    wait_for(all_ready, 90, "the image on all three nodes")
    assert image(fleet, ns, "everywhere")["status"]["phase"] == "Ready"
    partial = [p for p in seen if p.endswith("%") and 0 < int(p[:-1]) < 100]
    assert partial, f"no progress between 0 and 100% was shown: {seen}"
    out = fleet.kubectl("get", "vmimg", "everywhere", "-n", ns)
    assert "Ready" in out and "raw" in out and "100%" in out


def test_an_agent_killed_mid_download_starts_over_cleanly(fleet: Fleet, ns: str, server: ImageServer) -> None:
    apply_image(fleet, ns, "interrupted", server.url("/slow/slow.raw"))
    apply_image_vm(fleet, ns, "patient", "interrupted", zone="b")
    scratch = fleet.node_dir("node-b") / "image-cache" / "scratch"
    vm = fleet.wait_phase(ns, "patient", "Provisioning", 30)
    assert condition(vm, "ImageReady")["reason"] == "ImageDownloading"
    wait_for(lambda: any(scratch.iterdir()), 30, "a partial download in scratch")
    agent = fleet.agents["node-b"]
    killed = agent.pid
    assert any(f".{killed}." in p.name for p in scratch.iterdir())
    agent.kill()
    agent.restart(fleet.plane)
    agent.wait_ready()
    fleet.wait_phase(ns, "patient", "Running", 90)
    # The killed download's leftovers were removed (scratch files carry their process's pid).
    assert not [p for p in scratch.iterdir() if f".{killed}." in p.name]
    img = image(fleet, ns, "interrupted")
    assert img["status"]["phase"] == "Ready"
    assert disk_info(fleet.vm_disk("node-b", ns, "patient", "root")).virtual_size == 2 * files.MIB


def test_a_base_nothing_refers_to_is_collected_after_the_grace_period(
    fleet: Fleet, ns: str, server: ImageServer
) -> None:
    files.raw(server.root / "gc.raw", marker=f"only for {ns}".encode())  # bytes no other test has
    apply_image(fleet, ns, "short-lived", server.url("/files/gc.raw"))
    apply_image_vm(fleet, ns, "brief", "short-lived")
    fleet.wait_phase(ns, "brief", "Running")
    base = Path(str(disk_info(fleet.vm_disk("node-a", ns, "brief", "root")).backing))
    fleet.kubectl("delete", "vm", "brief", "-n", ns, "--wait=true", "--timeout=60s")
    # The collector has run past its grace period (3 s) since: the VmImage still refers to the base.
    agent = fleet.agents["node-a"]
    runs = fleet.metrics(agent)["vmm_agent_image_gc_runs_total"]
    fleet.wait_metric_above(agent, "vmm_agent_image_gc_runs_total", runs + 4)
    assert base.exists()
    fleet.kubectl("delete", "vmimg", "short-lived", "-n", ns, "--wait=true", "--timeout=30s")
    wait_for(lambda: not base.exists(), 30, "the unreferenced base to be collected")
    assert not base.with_suffix(".json").exists()
