"""A real guest on real QEMU (TCG) through libvirtd: Debian's cloud kernel booted directly with a
busybox initramfs the test builds, its console read through `kubectl vm console`."""

import hashlib
import io
from pathlib import Path

import pycdlib
import pytest
import yaml

from formation_vmm.api.names import GROUP, VERSION
from formation_vmm.devcluster.guest import BOOT_MARKER, DISK_NOW, DISK_SAYS, POWEROFF_MARKER, TICK, install
from formation_vmm.devcluster.guest import ticks_in as ticks
from formation_vmm.host.qemu_img import info as disk_info
from tests.support.fleet import ON_QEMU, QEMU_NODE, Fleet, condition
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def guest_files(fleet: Fleet) -> dict[str, str]:
    """Kernel and initramfs in node-q's images directory; returns their sha256 checksums."""
    files = install(fleet.images_dir(QEMU_NODE))
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def apply_image(fleet: Fleet, namespace: str, name: str, path: str, checksum: str | None = None) -> None:
    spec: dict[str, object] = {"source": {"hostPath": {"path": path}}}
    if checksum:
        spec["checksum"] = f"sha256:{checksum}"
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VmImage",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))


def guest_spec(cmdline: str = "", **extra: object) -> dict[str, object]:
    return {
        **ON_QEMU,
        "memory": "128Mi",
        "terminationGracePeriodSeconds": 1,
        "kernel": {
            "image": "kernel",
            "initrd": "initrd",
            "cmdline": f"console=ttyS0 panic=-1 {cmdline}".strip(),
        },
        **extra,
    }


def console(fleet: Fleet, namespace: str, name: str) -> str:
    return fleet.console(namespace, name)


def test_boot_console_pause_resume_stop(fleet: Fleet, ns: str, guest_files: dict[str, str]) -> None:
    apply_image(fleet, ns, "kernel", "guest/vmlinuz", guest_files["vmlinuz"])
    # The VM comes first: it waits in Provisioning for the image it names, then starts.
    fleet.apply_vm(ns, "guest", **guest_spec())
    vm = fleet.wait_vm(
        ns, "guest", lambda v: condition(v, "ImageReady").get("reason") == "ImageNotFound", "waiting"
    )
    assert vm["status"]["phase"] == "Provisioning"
    assert condition(vm, "ImageReady")["message"] == f"VmImage {ns}/initrd does not exist"
    apply_image(fleet, ns, "initrd", "guest/initrd.gz", guest_files["initrd.gz"])
    fleet.wait_phase(ns, "guest", "Running", 60)
    wait_for(lambda: BOOT_MARKER in console(fleet, ns, "guest"), 60, "the guest's /init to print its marker")
    assert "Linux version" in console(fleet, ns, "guest")

    for verb, phase in (("pause", "Paused"), ("resume", "Running"), ("stop", "Stopped")):
        out = fleet.plugin("-n", ns, verb, "guest")
        assert out.returncode == 0, out.stderr
        assert fleet.vm(ns, "guest")["status"]["phase"] == phase


def test_guest_power_off_per_run_strategy(fleet: Fleet, ns: str, guest_files: dict[str, str]) -> None:
    apply_image(fleet, ns, "kernel", "guest/vmlinuz")
    apply_image(fleet, ns, "initrd", "guest/initrd.gz")
    # The guest powers itself off 2 s after /init starts, as an OS shutting down would.
    fleet.apply_vm(ns, "once-off", runStrategy="RerunOnFailure", **guest_spec("vmm.poweroff=2"))
    vm = fleet.wait_phase(ns, "once-off", "Stopped", 90)
    assert vm["status"].get("restartCount", 0) == 0  # a clean power-off is no failure
    assert POWEROFF_MARKER in console(fleet, ns, "once-off")
    fleet.kubectl("delete", "vm", "once-off", "-n", ns)

    fleet.apply_vm(ns, "always-on", runStrategy="Always", **guest_spec("vmm.poweroff=2"))
    vm = fleet.wait_vm(
        ns, "always-on", lambda v: v.get("status", {}).get("restartCount", 0) >= 1, "restarted", 90
    )
    assert vm["status"]["phase"] in ("Running", "Stopped")


def test_a_wrong_checksum_keeps_the_vm_waiting(fleet: Fleet, ns: str, guest_files: dict[str, str]) -> None:
    apply_image(fleet, ns, "kernel", "guest/vmlinuz", "0" * 64)
    apply_image(fleet, ns, "initrd", "guest/initrd.gz")
    fleet.apply_vm(ns, "bad", **guest_spec())
    vm = fleet.wait_vm(
        ns, "bad", lambda v: condition(v, "ImageReady").get("reason") == "ChecksumMismatch", "refused"
    )
    assert vm["status"]["phase"] == "Provisioning"
    assert "does not match its checksum" in condition(vm, "ImageReady")["message"]
    events = fleet.kubectl("get", "events", "-n", ns, "--field-selector", "involvedObject.name=bad")
    assert "ChecksumMismatch" in events


def test_cloud_init_seed_is_attached(fleet: Fleet, ns: str) -> None:
    user_data = "#cloud-config\nhostname: seeded\n"
    fleet.apply_vm(ns, "seeded", cloudInit={"userData": user_data}, **{**ON_QEMU, "cpus": 1})
    fleet.wait_phase(ns, "seeded", "Running", 60)
    uid = fleet.vm(ns, "seeded")["metadata"]["uid"]
    seed = fleet.node_dir(QEMU_NODE) / "run" / ns / "seeded" / uid / "cloud-init.iso"
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        assert iso.get_record(joliet_path="/").file_identifier()  # readable as an ISO
        assert iso.pvd.volume_identifier.decode().strip() == "cidata"
        content = {}
        for name in ("user-data", "meta-data"):
            buf = io.BytesIO()
            iso.get_file_from_iso_fp(buf, joliet_path=f"/{name}")
            content[name] = buf.getvalue().decode()
    finally:
        iso.close()
    assert content["user-data"] == user_data
    vm = fleet.vm(ns, "seeded")
    assert yaml.safe_load(content["meta-data"]) == {
        "instance-id": vm["metadata"]["uid"],
        "local-hostname": "seeded",
    }
    dumped = fleet.virsh("dumpxml", f"{ns}_seeded")  # the domain really has the seed, read-only
    assert str(seed) in dumped and "<readonly/>" in dumped


def test_snapshot_and_restore_bring_back_what_the_guest_wrote(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    """The guest keeps a counter on its disk: each boot reads it, prints it, writes it plus one.
    Snapshot live after the first boot (count=1), reboot (the guest overwrites it with 2),
    restore: the next boot finds count=1 again."""
    apply_image(fleet, ns, "kernel", "guest/vmlinuz")
    apply_image(fleet, ns, "initrd", "guest/initrd.gz")
    fleet.apply_vm(ns, "keeper", **guest_spec("vmm.disk=1", disks=[{"name": "data", "size": "1Mi"}]))
    fleet.wait_phase(ns, "keeper", "Running", 60)
    wait_for(
        lambda: f"{DISK_NOW} count=1" in console(fleet, ns, "keeper"), 90, "the first boot to write count=1"
    )

    snapshot = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VmSnapshot",
        "metadata": {"name": "first", "namespace": ns},
        "spec": {"vmName": "keeper"},
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(snapshot))
    ready = wait_for(
        lambda: (
            (s := get_json(fleet.kubectl, "vmsnap", "first", "-n", ns)).get("status", {}).get("phase")
            == "Ready"
            and s
        ),
        60,
        "the live snapshot",
    )
    assert ready["status"]["nodeName"] == QEMU_NODE and ready["status"]["memory"] is False
    assert fleet.vm(ns, "keeper")["status"]["phase"] == "Running"  # taken live, not stopped

    out = fleet.plugin("-n", ns, "restart", "keeper", "--timeout", "40")
    assert out.returncode == 0, (out.stderr, fleet.vm(ns, "keeper"))
    try:
        wait_for(
            lambda: f"{DISK_NOW} count=2" in console(fleet, ns, "keeper"), 90, "the reboot to overwrite it"
        )
    except AssertionError:
        print(console(fleet, ns, "keeper")[-3000:])
        print(fleet.vm(ns, "keeper"))
        raise

    restore = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VmRestore",
        "metadata": {"name": "back", "namespace": ns},
        "spec": {"vmName": "keeper", "snapshotName": "first"},
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(restore))
    wait_for(
        lambda: (
            get_json(fleet.kubectl, "vmrestore", "back", "-n", ns).get("status", {}).get("phase")
            == "Succeeded"
        ),
        60,
        "the restore",
    )
    # Booted again per runStrategy Always: the third boot reads what the first one wrote.
    wait_for(
        lambda: console(fleet, ns, "keeper").count(f"{DISK_SAYS} [count=1]") == 2,
        90,
        "the guest to find count=1 again",
    )
    log = console(fleet, ns, "keeper")
    assert log.count(f"{DISK_SAYS} [count=2]") == 0, log[-2000:]

    # A bigger size grows the disk of the running guest through libvirt, without a restart.
    before = fleet.vm(ns, "keeper")["status"].get("restartCount")
    fleet.kubectl(
        "patch", "vm", "keeper", "-n", ns, "--type=json",
        "-p", '[{"op": "replace", "path": "/spec/disks/0/size", "value": "4Mi"}]',
    )  # fmt: skip
    overlay = fleet.vm_disk(QEMU_NODE, ns, "keeper", "data")
    wait_for(lambda: disk_info(overlay).virtual_size == 4 << 20, 30, "the live disk to grow to 4Mi")
    vm = fleet.vm(ns, "keeper")
    assert vm["status"]["phase"] == "Running" and vm["status"].get("restartCount") == before


def test_a_memory_snapshot_restores_the_running_guest_without_a_boot(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    apply_image(fleet, ns, "kernel", "guest/vmlinuz")
    apply_image(fleet, ns, "initrd", "guest/initrd.gz")
    fleet.apply_vm(
        ns, "sleeper", **guest_spec("vmm.disk=1 vmm.tick=1", disks=[{"name": "data", "size": "1Mi"}])
    )
    wait_for(lambda: f"{TICK} 2 " in console(fleet, ns, "sleeper"), 90, "the guest to boot and tick")
    snapshot = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VmSnapshot",
        "metadata": {"name": "awake", "namespace": ns},
        "spec": {"vmName": "sleeper", "includeMemory": True},
    }
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(snapshot))
    ready = wait_for(
        lambda: (
            (s := get_json(fleet.kubectl, "vmsnap", "awake", "-n", ns)).get("status", {}).get("phase")
            in ("Ready", "Failed")
            and s
        ),
        90,
        "the memory snapshot",
    )
    assert ready["status"]["phase"] == "Ready", ready["status"]
    assert ready["status"]["memory"] is True
    restore = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VmRestore",
        "metadata": {"name": "wake", "namespace": ns},
        "spec": {"vmName": "sleeper", "snapshotName": "awake"},
    }
    # Let the guest count on past the snapshot, so that a resumed guest shows by counting again.
    at_snapshot = ticks(console(fleet, ns, "sleeper"))[-1][0]
    wait_for(lambda: ticks(console(fleet, ns, "sleeper"))[-1][0] >= at_snapshot + 2, 30, "two more ticks")
    before = console(fleet, ns, "sleeper")
    boot_id = ticks(before)[-1][1]
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(restore))
    done = wait_for(
        lambda: (
            (r := get_json(fleet.kubectl, "vmrestore", "wake", "-n", ns)).get("status", {}).get("phase")
            in ("Succeeded", "Failed")
            and r
        ),
        90,
        "the restore",
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]
    fleet.wait_phase(ns, "sleeper", "Running")

    # The guest goes on where the snapshot left it: the same boot, and its counter takes up the
    # count it had then, below what it had reached since. (The old guest may print a tick or two
    # between the reading of `before` and the restore: those count on.)
    def restored() -> list[tuple[int, str]]:
        seen = ticks(console(fleet, ns, "sleeper")[len(before) :])
        return seen if any(n <= at_snapshot + 1 for n, _ in seen) else []

    after = wait_for(restored, 60, "the guest to count on from the snapshot's count")
    assert {boot for _, boot in after} == {boot_id}
    assert at_snapshot + 1 < ticks(before)[-1][0], "the guest had counted past the snapshot"
    assert BOOT_MARKER not in console(fleet, ns, "sleeper")[len(before) :]
    assert fleet.vm(ns, "sleeper")["status"]["phase"] == "Running"


def test_a_guest_reads_its_image_through_the_overlay_and_writes_only_the_overlay(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    counter = fleet.images_dir(QEMU_NODE) / "guest" / "counter.raw"
    with counter.open("wb") as f:
        f.truncate(1 << 20)
        f.write(b"count=41\n")
    apply_image(fleet, ns, "kernel", "guest/vmlinuz")
    apply_image(fleet, ns, "initrd", "guest/initrd.gz")
    apply_image(fleet, ns, "counter", "guest/counter.raw")
    fleet.apply_vm(ns, "reader", **guest_spec("vmm.disk=1", disks=[{"name": "data", "image": "counter"}]))
    wait_for(lambda: f"{DISK_NOW} count=42" in console(fleet, ns, "reader"), 90, "the guest to count on")
    assert f"{DISK_SAYS} [count=41]" in console(fleet, ns, "reader")
    # The cached base is untouched: the write went to the VM's overlay.
    base = disk_info(fleet.vm_disk(QEMU_NODE, ns, "reader", "data")).backing
    assert base is not None
    assert Path(base).read_bytes()[:9] == b"count=41\n"


def test_a_running_guest_has_its_series_on_the_agents_metrics(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    """libvirt's bulk statistics of a real guest, on node-q's /metrics with the VM's labels: CPU
    time that grows, memory, the disk's reads (the kernel probes it at boot), the phase."""
    apply_image(fleet, ns, "kernel", "guest/vmlinuz")
    apply_image(fleet, ns, "initrd", "guest/initrd.gz")
    fleet.apply_vm(ns, "measured", **guest_spec(disks=[{"name": "data", "size": "64Mi"}]))
    fleet.wait_phase(ns, "measured", "Running", 60)
    wait_for(lambda: BOOT_MARKER in console(fleet, ns, "measured"), 60, "the guest to boot")
    agent = fleet.agents[QEMU_NODE]
    vm = f'name="measured",namespace="{ns}",node="{QEMU_NODE}"'

    def cpu() -> float:
        return fleet.metrics(agent).get(f"vmm_vm_cpu_seconds_total{{{vm}}}", 0.0)

    first = wait_for(cpu, 30, "CPU time on /metrics")
    wait_for(lambda: cpu() > first, 30, "the guest's CPU time to grow")
    got = fleet.metrics(agent)
    assert got[f'vmm_vm_stats_up{{node="{QEMU_NODE}"}}'] == 1
    assert got[f"vmm_vm_vcpus{{{vm}}}"] == 1
    assert got[f"vmm_vm_memory_maximum_bytes{{{vm}}}"] == 128 << 20
    assert got[f"vmm_vm_memory_resident_bytes{{{vm}}}"] > 0
    assert got[f'vmm_vm_disk_read_requests_total{{disk="vda",{vm}}}'] > 0
    assert got[f'vmm_vm_phase{{{vm},phase="Running"}}'] == 1
    # The phase-transition histogram saw this VM come up.
    assert got['vmm_vm_phase_transition_from_creation_seconds_count{phase="Running"}'] >= 1
    # kubectl vm top: the same counters, as rates, through the agent's authorised endpoint.
    out = fleet.plugin("-n", ns, "top", "measured", "--interval=1")
    assert out.returncode == 0, out.stderr
    [header, row] = [line.split() for line in out.stdout.splitlines()]
    assert header[:3] == ["NAME", "CPU", "MEMORY"] and row[0] == "measured"
    # The counters came through (an idle guest's CPU over one second may round to 0.0%; the
    # series above prove it grows): QEMU's resident memory is there, in Mi.
    assert float(row[1].rstrip("%")) >= 0
    assert row[2].endswith("Mi") and float(row[2].removesuffix("Mi")) > 10


def test_a_uefi_guest_boots_through_ovmf_with_its_own_nvram(
    fleet: Fleet, ns: str, guest_files: dict[str, str]
) -> None:
    """firmware: efi on real QEMU: OVMF (Debian's ovmf) starts the kernel, the VM's NVRAM is
    made from the template beside its disks, and goes with the VM."""
    apply_image(fleet, ns, "kernel", "guest/vmlinuz")
    apply_image(fleet, ns, "initrd", "guest/initrd.gz")
    # OVMF itself needs more than 128Mi (it faults at start with less); 256Mi boots.
    fleet.apply_vm(ns, "uefi", **guest_spec(firmware={"type": "efi"}, memory="256Mi"))
    vm = fleet.wait_phase(ns, "uefi", "Running", 60)
    wait_for(lambda: BOOT_MARKER in console(fleet, ns, "uefi"), 120, "the guest to boot through OVMF")
    xml = fleet.virsh("dumpxml", f"{ns}_uefi")
    assert "/usr/share/OVMF/OVMF_CODE_4M.fd</loader>" in xml
    nvram = fleet.node_dir(QEMU_NODE) / "disks" / ns / "uefi" / vm["metadata"]["uid"] / "nvram.fd"
    assert nvram.stat().st_size == Path("/usr/share/OVMF/OVMF_VARS_4M.fd").stat().st_size
    fleet.kubectl("delete", "vm", "uefi", "-n", ns, "--wait=true", "--timeout=60s")
    assert not nvram.exists()
    assert f"{ns}_uefi" not in fleet.virsh("list", "--all", "--name")
