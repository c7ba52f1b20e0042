"""The reconciler against a real libvirtd and QEMU (TCG: nested KVM guests hang here)."""

import time
import uuid
from pathlib import Path

import pytest

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.plan import Action, DomainState
from formation_vmm.agent.reconcile import Reconciler
from formation_vmm.domain.layout import NodeLayout
from tests.factories import make_vm

pytestmark = pytest.mark.libvirt


def test_a_real_qemu_domain_starts_pauses_and_goes(tmp_path: Path) -> None:
    hv = Hypervisor("qemu:///system")
    layout = NodeLayout(vm_dir=tmp_path / "run", disks_dir=tmp_path / "disks", images_dir=tmp_path / "images")
    rec = Reconciler(hv, layout, "qemu")
    name = f"qemu-{uuid.uuid4().hex[:8]}"
    disks = [{"name": "d", "size": "16Mi"}]
    vm = make_vm(name=name, uid=str(uuid.uuid4()), cpus=1, memory="64Mi", disks=disks)
    try:
        out = rec.reconcile(vm)
        assert out.actions == [Action.PREPARE_FILES, Action.DEFINE, Action.START]
        assert out.domain is not None and out.domain.actual.state is DomainState.RUNNING
        # QEMU really runs: the console log it opened exists and its pid file is there.
        assert layout.console_log("default", name).exists()
        assert Path(f"/run/libvirt/qemu/{out.domain.name}.pid").exists()
        paused = vm.model_copy(update={"spec": vm.spec.model_copy(update={"paused": True})})
        assert rec.reconcile(paused).actions == [Action.SUSPEND]
        assert rec.reconcile(vm).actions == [Action.RESUME]
        # No OS answers ACPI here: the grace period runs out and the domain is stopped hard.
        started = time.monotonic()
        halted = vm.model_copy(update={"spec": vm.spec.model_copy(update={"run_strategy": "Halted"})})
        out = rec.reconcile(halted, grace_seconds=1)
        assert out.actions == [Action.SHUTDOWN]
        assert out.domain is not None and out.domain.actual.state is DomainState.SHUTOFF
        assert time.monotonic() - started < 30
    finally:
        rec.reconcile(vm, deleting=True, grace_seconds=0)
        hv.close()
    assert not layout.disk_dir("default", name).exists()
