"""The reconciler against a real libvirtd and QEMU (TCG: nested KVM guests hang here)."""

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.plan import Action, DomainState
from formation_vmm.agent.state import owner_of
from formation_vmm.agent.vms.reconcile import Reconciler
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.domain.layout import NodeLayout
from tests.support.factories import InlineInputs, make_vm

pytestmark = pytest.mark.libvirt


class Clock:
    """The reconciler's clock, moved by the test: a grace period runs out when the test says."""

    now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_real_qemu_domain_starts_pauses_and_stops_without_waiting(
    tmp_path: Path, qemu_node: LibvirtNode
) -> None:
    hv = Hypervisor(qemu_node.uri)
    layout = NodeLayout(
        vm_dir=tmp_path / "run",
        disks_dir=tmp_path / "disks",
        images_dir=tmp_path / "images",
        cache_dir=tmp_path / "image-cache",
    )
    clock = Clock()
    rec = Reconciler(hv, layout, "qemu", InlineInputs(), clock)
    name = f"qemu-{uuid.uuid4().hex[:8]}"
    disks = [{"name": "d", "size": "16Mi"}]
    vm = make_vm(
        name=name, uid=str(uuid.uuid4()), cpus=1, memory="64Mi", disks=disks, terminationGracePeriodSeconds=30
    )
    try:
        out = rec.reconcile(vm)
        assert out.actions == [Action.PREPARE_FILES, Action.DEFINE, Action.START]
        assert out.domain is not None and out.domain.actual.state is DomainState.RUNNING
        # QEMU really runs: the console log it opened exists and its pid file is there.
        assert layout.console_log(owner_of(vm)).exists()
        assert qemu_node.path(f"/run/libvirt/qemu/{out.domain.name}.pid").exists()
        assert hv.runs_qemu
        paused = vm.model_copy(update={"spec": vm.spec.model_copy(update={"paused": True})})
        assert rec.reconcile(paused).actions == [Action.SUSPEND]
        assert rec.reconcile(vm).actions == [Action.RESUME]
        # No OS answers ACPI here. The stop is asked for, and the reconciler returns at once
        # with the deadline to come back at; nothing waits out the grace period.
        halted = vm.model_copy(update={"spec": vm.spec.model_copy(update={"run_strategy": "Halted"})})
        out = rec.reconcile(halted)
        assert out.actions == [Action.SHUTDOWN]
        assert out.domain is not None and out.domain.actual.state is DomainState.RUNNING
        # Looked at again halfway through the grace period, when the guest agent is asked.
        assert out.stopping and out.requeue_after == 15
        clock.now += 10
        out = rec.reconcile(halted)
        assert out.actions == [] and out.stopping and out.requeue_after == 5
        clock.now += 5  # halfway: this guest has no agent to ask, and the stop goes on
        out = rec.reconcile(halted)
        assert out.actions == [Action.AGENT_SHUTDOWN] and out.stopping and out.requeue_after == 15
        assert out.domain is not None and out.domain.actual.state is DomainState.RUNNING
        clock.now += 15  # the grace period is over: stopped hard
        out = rec.reconcile(halted)
        assert out.actions == [Action.DESTROY]
        assert out.domain is not None and out.domain.actual.state is DomainState.SHUTOFF
        assert not out.stopping and out.requeue_after is None
        # A restart of the running VM: the same graceful stop, then a start, after which no stop
        # is under way and the restart is done.
        assert rec.reconcile(vm).actions == [Action.START]
        restart = vm.model_copy(
            update={"spec": vm.spec.model_copy(update={"restart_requested_at": datetime.now(UTC)})}
        )
        out = rec.reconcile(restart)
        assert out.actions == [Action.SHUTDOWN] and out.stopping and not out.restart_done
        clock.now += 15
        assert rec.reconcile(restart).actions == [Action.AGENT_SHUTDOWN]
        clock.now += 15
        out = rec.reconcile(restart)
        assert out.actions == [Action.DESTROY, Action.START]
        assert out.domain is not None and out.domain.actual.state is DomainState.RUNNING
        assert not out.stopping and out.requeue_after is None and out.restart_done
    finally:
        rec.reconcile(vm, deleting=True, grace_seconds=0)
        hv.close()
    assert not layout.disk_dir(owner_of(vm)).exists()
