"""Live migration's data path on two real nodes (each its own libvirtd, devcluster.libvirt_node)
with a real guest on QEMU's TCG: memory and the disk's top overlay travel over UNIX sockets,
the base stays (each node has its own copy, as the image cache gives). The guest counts in
memory (vmm.tick) and on its disk (vmm.disk): after the move its counter goes on under the same
boot id, and its disk holds what it wrote on the source."""

import threading
import uuid
from pathlib import Path

import pytest

from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.hypervisor.migration import abort, completed_job, migrate, migrating
from formation_vmm.devcluster import guest
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.processes import ProcessTable
from formation_vmm.host import qemu_img
from tests.support.waiting import wait_for

pytestmark = pytest.mark.libvirt


def domain_xml(name: str, uid: str, kernel: Path, initrd: Path, node: Path) -> str:
    cmdline = "vmm.tick=1 vmm.disk=1 vmm.dirty=16"
    disk, console = node / "top.qcow2", node / "console.log"
    return guest.bare_domain_xml(name, uid, kernel, initrd, disk, console, 256, cmdline)


def fresh_overlay(disks: Path) -> None:
    """A new, empty top overlay over the node's base, as the target agent makes before each
    attempt: a cancelled attempt leaves half-copied data in the old one."""
    base, top = disks / "base.qcow2", disks / "top.qcow2"
    top.unlink(missing_ok=True)
    qemu_img.run("create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top))


def test_a_running_guest_moves_with_its_memory_and_its_overlay_after_a_cancelled_try(tmp_path: Path) -> None:
    """First a move at 1 MiB/s, cancelled (the guest's memory, its kernel, its initramfs and the
    16 MiB it keeps rewriting, takes tens of seconds to copy at that rate): the guest counts on, on
    the source, under the same boot id, and the target holds no domain. Then the move itself:
    the counter goes on under the same boot id on the target, and the disk holds what the guest
    wrote on the source. One guest for both, to keep the tier short."""
    table = ProcessTable(tmp_path / "pids.json")
    nodes = [LibvirtNode(tmp_path / n, f"mig-{n}", table) for n in ("a", "b")]
    kernel, initrd = guest.install(tmp_path / "images")
    disks = [tmp_path / n / "disks" for n in ("a", "b")]
    for d in disks:
        d.mkdir(parents=True)
        # The same (empty) base on each node, as the image cache gives, and an overlay over it.
        qemu_img.run("create", "-f", "qcow2", str(d / "base.qcow2"), "64M")
        fresh_overlay(d)
    uid = str(uuid.uuid4())
    for node in nodes:
        node.start()
    try:
        source, target = (Hypervisor(n.uri) for n in nodes)
        source.connection().defineXML(domain_xml("mig", uid, kernel, initrd, disks[0])).create()
        log = disks[0] / "console.log"
        wait_for(lambda: len(guest.ticks(log)) >= 3, 120, "the guest to tick on the source")
        assert f"{guest.DISK_NOW} count=1" in log.read_text(errors="replace")
        # It also keeps rewriting 16 MiB of its memory: each move has pages to send again.
        wait_for(lambda: guest.DIRTY in log.read_text(errors="replace"), 60, "the guest to write memory")
        (_, boot) = guest.ticks(log)[-1]

        def move(attempt: str, bandwidth_mib: int = 0) -> None:
            migrate(
                source, "mig", nodes[1].uri, domain_xml("mig", uid, kernel, initrd, disks[1]),
                f"unix://{tmp_path}/memory-{attempt}.sock", f"unix://{tmp_path}/disks-{attempt}.sock",
                ["vda"], bandwidth_mib=bandwidth_mib,
            )  # fmt: skip

        failed: list[Exception] = []

        def slow_move() -> None:
            try:
                move("slow", bandwidth_mib=1)
            except HypervisorError as exc:
                failed.append(exc)

        mover = threading.Thread(target=slow_move)
        mover.start()
        wait_for(lambda: migrating(source, "mig"), 30, "the migration to start")
        abort(source, "mig")
        mover.join(60)
        assert not mover.is_alive() and failed, "the migration ended by the cancel"
        assert "cancel" in str(failed[0]).lower() or "abort" in str(failed[0]).lower(), failed[0]
        assert source.require("mig").isActive()
        assert target.connection().listAllDomains() == []
        seen = len(guest.ticks(log))
        wait_for(lambda: len(guest.ticks(log)) >= seen + 2, 30, "the guest to tick on, on the source")
        assert {b for _, b in guest.ticks(log)} == {boot}

        fresh_overlay(disks[1])
        (count, _) = guest.ticks(log)[-1]
        move("full")
        assert source.connection().listAllDomains() == []  # undefined on the source
        moved = target.require("mig")
        assert moved.isActive() and moved.isPersistent()
        on_target = disks[1] / "console.log"
        wait_for(lambda: len(guest.ticks(on_target)) >= 2, 60, "the guest to tick on the target")
        wait_for(lambda: guest.DIRTY in on_target.read_text(errors="replace"), 60,
                 "the guest to write memory on, on the target")  # fmt: skip
        after = guest.ticks(on_target)
        assert {b for _, b in after} == {boot}  # not booted again
        assert after[0][0] > count  # the memory's counter went on
        job = completed_job(target, "mig")
        assert 0 < job["downtime"] < job["time_elapsed"]
        print(f"migrated 256 MiB on TCG: {job['time_elapsed']} ms, downtime {job['downtime']} ms")

        # The disk: booted again on the target, the guest reads what it wrote on the source.
        moved.destroy()
        moved.create()
        wait_for(lambda: f"{guest.DISK_SAYS} [count=1]" in on_target.read_text(errors="replace"), 120,
                 "the guest to read its disk on the target")  # fmt: skip
    finally:
        for node in nodes:
            node.stop()
