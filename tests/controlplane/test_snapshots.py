"""VmSnapshot and VmRestore through the fleet's test:/// nodes: the data is real (internal
qcow2 snapshots in the VM's real disk files, written and read with qemu-io); the domain is the
test driver's, which holds no file open, so the agent takes these snapshots with qemu-img. The
live QEMU path (and a guest that finds its marker again) is in test_real_guest.py."""

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fleet import Fleet, condition
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane

ON_A = {"zone": "a"}


def doc(kind: str, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def apply(fleet: Fleet, kind: str, namespace: str, name: str, spec: dict[str, Any]) -> None:
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc(kind, namespace, name, spec)))


def apply_vm_with_disk(fleet: Fleet, namespace: str, name: str) -> None:
    """A small VM on node-a with one blank 16Mi disk, ``data``."""
    fleet.apply_vm(
        namespace, name, cpus=1, memory="64Mi", nodeSelector=ON_A, disks=[{"name": "data", "size": "16Mi"}]
    )


def wait_phase(
    fleet: Fleet, kind: str, namespace: str, name: str, phase: str, timeout: float = 60
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        got = get_json(fleet.kubectl, kind, name, "-n", namespace)
        return got if got.get("status", {}).get("phase") == phase else None

    return wait_for(probe, timeout, f"{kind} {name} phase {phase}")  # type: ignore[no-any-return]


def disk(fleet: Fleet, namespace: str, vm: str, name: str = "data", node: str = "node-a") -> Path:
    return fleet.vm_disk(node, namespace, vm, name)


def write_pattern(path: Path, byte: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} 0 64k", str(path)], check=True, capture_output=True
    )


def has_pattern(path: Path, byte: int) -> bool:
    done = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"read -P {byte} 0 64k", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


def internal_snapshots(path: Path) -> str:
    return subprocess.run(
        ["qemu-img", "snapshot", "-l", "-U", str(path)], capture_output=True, text=True, check=True
    ).stdout


def test_snapshot_restore_and_delete_on_a_vms_disks(fleet: Fleet, ns: str) -> None:
    apply_vm_with_disk(fleet, ns, "db")
    fleet.wait_phase(ns, "db", "Running")
    data = disk(fleet, ns, "db")
    write_pattern(data, 0x41)
    apply(fleet, "VmSnapshot", ns, "before", {"vmName": "db"})
    snap = wait_phase(fleet, "vmsnap", ns, "before", "Ready")
    status = snap["status"]
    assert status["readyToUse"] is True and status["nodeName"] == "node-a" and status["disks"] == ["data"]
    assert status["size"] > 0 and status["memory"] is False and status["creationTime"]
    assert snap["metadata"]["labels"]["vmm.formation.cloud/node"] == "node-a"
    assert snap["metadata"]["ownerReferences"][0]["name"] == "db"
    uid = snap["metadata"]["uid"]
    assert f"vmsnap-{uid}" in internal_snapshots(data)
    out = fleet.kubectl("get", "vmsnap", "-n", ns)
    assert out.split("\n")[0].split() == ["NAME", "PHASE", "VM", "READY", "SIZE", "AGE"]
    assert "before   Ready   db    true" in out

    write_pattern(data, 0x42)  # the VM "overwrites" its disk
    assert not has_pattern(data, 0x41)
    apply(fleet, "VmRestore", ns, "undo", {"vmName": "db", "snapshotName": "before"})
    restore = wait_phase(fleet, "vmrestore", ns, "undo", "Succeeded")
    assert restore["status"]["completedAt"]
    assert has_pattern(data, 0x41)
    fleet.wait_phase(ns, "db", "Running")  # started again per runStrategy Always
    events = json.loads(fleet.kubectl("get", "events", "-n", ns, "-o", "json"))["items"]
    assert any(e["reason"] == "Restored" and e["involvedObject"]["name"] == "db" for e in events)

    # Deleting the snapshot removes its data from the disk.
    fleet.kubectl("delete", "vmsnap", "before", "-n", ns, "--wait=true", "--timeout=30s")
    assert f"vmsnap-{uid}" not in internal_snapshots(data)


def test_restore_errors_are_reported(fleet: Fleet, ns: str) -> None:
    apply_vm_with_disk(fleet, ns, "app")
    fleet.wait_phase(ns, "app", "Running")
    apply(fleet, "VmRestore", ns, "nothing", {"vmName": "app", "snapshotName": "never-taken"})
    failed = wait_phase(fleet, "vmrestore", ns, "nothing", "Failed")
    assert failed["status"]["error"] == "VmSnapshot never-taken does not exist"
    apply_vm_with_disk(fleet, ns, "other")
    apply(fleet, "VmSnapshot", ns, "of-other", {"vmName": "other"})
    wait_phase(fleet, "vmsnap", ns, "of-other", "Ready")
    apply(fleet, "VmRestore", ns, "crossed", {"vmName": "app", "snapshotName": "of-other"})
    failed = wait_phase(fleet, "vmrestore", ns, "crossed", "Failed")
    assert "is of VM other, not app" in failed["status"]["error"]
    assert fleet.vm(ns, "app")["status"]["phase"] == "Running"  # a failed restore touches nothing


def test_memory_snapshot_and_revert(fleet: Fleet, ns: str) -> None:
    apply_vm_with_disk(fleet, ns, "mem")
    fleet.wait_phase(ns, "mem", "Running")
    apply(fleet, "VmSnapshot", ns, "full", {"vmName": "mem", "includeMemory": True})
    snap = wait_phase(fleet, "vmsnap", ns, "full", "Ready")
    assert snap["status"]["memory"] is True
    apply(fleet, "VmRestore", ns, "back", {"vmName": "mem", "snapshotName": "full"})
    wait_phase(fleet, "vmrestore", ns, "back", "Succeeded")
    vm = fleet.wait_phase(ns, "mem", "Running")
    assert condition(vm, "Ready")["status"] == "True"


def test_a_vm_with_snapshots_says_it_cannot_move_live(fleet: Fleet, ns: str) -> None:
    """A VmSnapshot lives inside the VM's disks, which a live migration leaves behind: from
    the snapshot's creation (before it is taken: the agent counts the object, as the
    controller does when it refuses the migration) until its deletion, the VM's
    LiveMigratable condition is False, HasSnapshots."""
    apply_vm_with_disk(fleet, ns, "kept")
    vm = fleet.wait_phase(ns, "kept", "Running")
    assert condition(vm, "LiveMigratable")["status"] == "True"

    def migratable() -> dict[str, Any]:
        return condition(fleet.vm(ns, "kept"), "LiveMigratable")

    apply(fleet, "VmSnapshot", ns, "one", {"vmName": "kept", "includeMemory": True})
    apply(fleet, "VmSnapshot", ns, "two", {"vmName": "kept"})
    wait_for(lambda: "2 VmSnapshot(s)" in migratable().get("message", ""), 30, "LiveMigratable to count 2")
    assert migratable()["status"] == "False" and migratable()["reason"] == "HasSnapshots"
    wait_phase(fleet, "vmsnap", ns, "one", "Ready")
    fleet.kubectl("delete", "vmsnap", "one", "-n", ns, "--wait=true", "--timeout=30s")
    wait_for(lambda: "1 VmSnapshot(s)" in migratable().get("message", ""), 30, "LiveMigratable to count 1")
    fleet.kubectl("delete", "vmsnap", "two", "-n", ns, "--wait=true", "--timeout=30s")
    wait_for(lambda: migratable().get("status") == "True", 30, "LiveMigratable to be True again")
    assert migratable()["reason"] == "Migratable"


def test_deleting_a_vm_deletes_its_snapshots(fleet: Fleet, ns: str) -> None:
    apply_vm_with_disk(fleet, ns, "gone")
    fleet.wait_phase(ns, "gone", "Running")
    apply(fleet, "VmSnapshot", ns, "s1", {"vmName": "gone"})
    wait_phase(fleet, "vmsnap", ns, "s1", "Ready")
    data = disk(fleet, ns, "gone")
    fleet.kubectl("delete", "vm", "gone", "-n", ns, "--wait=true", "--timeout=60s")
    assert not data.exists() and not data.parent.parent.exists()  # <ns>/gone/<uid>/ and <ns>/gone/
    fleet.wait_gone("vmsnap", ns, "s1")


def test_a_snapshot_of_a_vm_not_there_yet_says_so_then_is_taken(fleet: Fleet, ns: str) -> None:
    apply(fleet, "VmSnapshot", ns, "early", {"vmName": "later"})
    snap = wait_for(
        lambda: (
            (s := get_json(fleet.kubectl, "vmsnap", "early", "-n", ns)).get("status", {}).get("error") and s
        ),
        30,
        "the controller's note",
    )
    assert snap["status"] == {"phase": "Pending", "error": "VirtualMachine later does not exist"}
    apply_vm_with_disk(fleet, ns, "later")
    ready = wait_phase(fleet, "vmsnap", ns, "early", "Ready", 60)
    assert "error" not in ready["status"]


def test_the_plugin_snapshots_and_restores(fleet: Fleet, ns: str) -> None:
    apply_vm_with_disk(fleet, ns, "cli")
    fleet.wait_phase(ns, "cli", "Running")
    data = disk(fleet, ns, "cli")
    write_pattern(data, 0x51)
    out = fleet.plugin("-n", ns, "snapshot", "cli", "good")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("vmsnapshot/good Ready on node-a: ")
    write_pattern(data, 0x52)
    out = fleet.plugin("-n", ns, "restore", "cli", "good")
    assert out.returncode == 0, out.stderr
    assert "Succeeded: cli is back at good" in out.stdout
    assert has_pattern(data, 0x51)
    # The plugin once named a restore by the second alone, and a second one within that second
    # failed with "already exists" (CI saw it): the names of the next 20 s are taken first.
    now = datetime.now(UTC)
    spec = {"vmName": "cli", "snapshotName": "no-such-snapshot"}
    names = [f"cli-restore-{now + timedelta(seconds=s):%Y%m%d-%H%M%S}" for s in range(20)]
    taken = {"apiVersion": "v1", "kind": "List", "items": [doc("VmRestore", ns, n, spec) for n in names]}
    fleet.kubectl("apply", "-f", "-", input_text=yaml.safe_dump(taken))
    out = fleet.plugin("-n", ns, "restore", "cli", "no-such-snapshot")
    assert out.returncode == 1 and "VmSnapshot no-such-snapshot does not exist" in out.stderr
    out = fleet.plugin("-n", ns, "snapshot", "nobody")
    assert out.returncode == 1 and "virtualmachine" in out.stderr and "not found" in out.stderr
