"""The agent's reconciler against libvirt's test driver: real libvirt, no guest."""

import uuid
from pathlib import Path

import libvirt
import pytest

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.plan import Action, DomainState
from formation_vmm.agent.state import owner_of
from formation_vmm.agent.vms.inputs import InputNotReadyError
from formation_vmm.agent.vms.reconcile import Reconciler
from formation_vmm.agent.vms.status import status_after
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from formation_vmm.domain.spec import NodeFirmware
from tests.support.factories import InlineInputs, make_vm
from tests.support.golden import CASES, render

pytestmark = pytest.mark.libvirt

URI = "test:///default"


@pytest.fixture
def layout(tmp_path: Path) -> NodeLayout:
    return NodeLayout(
        vm_dir=tmp_path / "run",
        disks_dir=tmp_path / "disks",
        images_dir=tmp_path / "images",
        cache_dir=tmp_path / "image-cache",
    )


@pytest.fixture
def hv() -> Hypervisor:
    hv = Hypervisor(URI)
    yield hv
    hv.close()


def fresh_name() -> str:
    return f"vm-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("case", CASES)
def test_golden_xml_is_accepted_by_libvirt(case: str) -> None:
    conn = libvirt.open(URI)
    try:
        dom = conn.defineXML(render(case, domain_type="test"))
        try:
            assert dom.name() in render(case)
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_create_pause_resume_halt_delete(hv: Hypervisor, layout: NodeLayout) -> None:
    rec = Reconciler(hv, layout, "test", InlineInputs())
    name = fresh_name()
    vm = make_vm(
        name=name, uid=str(uuid.uuid4()), cpus=2, memory="256Mi", disks=[{"name": "data", "size": "64Mi"}]
    )
    dom = domain_name("default", name)

    out = rec.reconcile(vm)
    assert out.actions == [Action.PREPARE_FILES, Action.DEFINE, Action.START]
    assert out.domain is not None and out.domain.actual.state is DomainState.RUNNING
    assert out.domain.owner is not None and out.domain.owner.uid == vm.metadata.uid
    assert out.domain.vcpus == 2
    assert layout.disk_path(owner_of(vm), "data").exists()
    status = status_after(vm, vm.status, out, "node-a")
    assert status.phase == "Running" and status.started_at and status.domain_uuid == out.domain.uuid

    # Reconciling again changes nothing: idempotent.
    assert rec.reconcile(vm).actions == []

    paused = vm.model_copy(update={"spec": vm.spec.model_copy(update={"paused": True})})
    assert rec.reconcile(paused).actions == [Action.SUSPEND]
    assert hv.describe(dom).actual.state is DomainState.PAUSED  # type: ignore[union-attr]
    assert rec.reconcile(vm).actions == [Action.RESUME]

    halted = vm.model_copy(update={"spec": vm.spec.model_copy(update={"run_strategy": "Halted"})})
    out = rec.reconcile(halted)
    assert out.actions == [Action.SHUTDOWN]  # the test driver's guests obey ACPI at once
    assert hv.describe(dom).actual.state is DomainState.SHUTOFF  # type: ignore[union-attr]
    assert not out.stopping and out.requeue_after is None

    out = rec.reconcile(vm, deleting=True)
    assert out.actions == [Action.UNDEFINE, Action.REMOVE_FILES]
    assert out.domain is None
    assert not layout.disk_dir(owner_of(vm)).exists()
    assert not layout.runtime_dir(owner_of(vm)).exists()
    assert not (layout.disks_dir / "default" / name).exists()  # the name's directory went with it


def test_a_vm_deleted_and_created_again_under_its_name_never_meets_the_old_one(
    hv: Hypervisor, layout: NodeLayout
) -> None:
    rec = Reconciler(hv, layout, "test", InlineInputs())
    name = fresh_name()
    disks = [{"name": "data", "size": "1Mi"}]
    old = make_vm(name=name, uid="old-uid", disks=disks)
    new = make_vm(name=name, uid="new-uid", disks=disks)
    rec.reconcile(old)
    old_disk = layout.disk_path(owner_of(old), "data")
    old_disk.write_bytes(b"the old VM's data")
    # The new VM comes while the old domain is still defined: the old domain is replaced, and
    # the new VM gets a disk of its own, not the old one's.
    out = rec.reconcile(new)
    assert out.actions[:2] == [Action.DESTROY, Action.UNDEFINE]
    assert out.domain is not None and out.domain.owner is not None and out.domain.owner.uid == "new-uid"
    assert layout.disk_path(owner_of(new), "data") != old_disk
    # The old VM's deletion, late, removes its own files and leaves the new VM's domain alone.
    out = rec.reconcile(old, deleting=True, grace_seconds=0)
    assert out.actions == [Action.REMOVE_FILES]
    assert not old_disk.exists()
    after = hv.describe(domain_name("default", name))
    assert after is not None and after.owner is not None and after.owner.uid == "new-uid"
    assert after.actual.state is DomainState.RUNNING
    assert layout.disk_path(owner_of(new), "data").exists()
    rec.reconcile(new, deleting=True, grace_seconds=0)


def test_owned_domains_are_found_by_metadata_not_by_name(hv: Hypervisor, layout: NodeLayout) -> None:
    rec = Reconciler(hv, layout, "test", InlineInputs())
    name = fresh_name()
    vm = make_vm(name=name, uid=str(uuid.uuid4()))
    rec.reconcile(vm)
    owned = {d.owner.uid for d in hv.owned_domains() if d.owner}
    assert vm.metadata.uid in owned
    # test:///default ships a domain named "test" that is not ours.
    assert all(d.name != "test" for d in hv.owned_domains())
    rec.reconcile(vm, deleting=True)


def test_a_symlinked_vm_directory_is_not_followed(hv: Hypervisor, layout: NodeLayout, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    name = fresh_name()
    vm = make_vm(name=name, uid=str(uuid.uuid4()), disks=[{"name": "data", "size": "1Mi"}])
    layout.disk_dir(owner_of(vm)).parent.mkdir(parents=True)
    layout.disk_dir(owner_of(vm)).symlink_to(outside)
    rec = Reconciler(hv, layout, "test", InlineInputs())
    with pytest.raises(RuntimeError, match="outside"):
        rec.reconcile(vm)
    rec.reconcile(vm, deleting=True)
    assert (outside / "precious").read_text() == "keep me"


def test_a_uefi_vm_waits_for_missing_firmware_and_goes_with_its_nvram(
    hv: Hypervisor, layout: NodeLayout, tmp_path: Path
) -> None:
    """A node without OVMF: the VM waits, saying which file is missing; once the files are
    there it gets a domain with its own NVRAM, and leaves without a trace."""
    firmware = NodeFirmware(efi_code=tmp_path / "fw" / "CODE.fd", efi_vars=tmp_path / "fw" / "VARS.fd")
    rec = Reconciler(hv, layout, "test", InlineInputs(), firmware=firmware)
    vm = make_vm(name=fresh_name(), uid=str(uuid.uuid4()), firmware={"type": "efi"})
    with pytest.raises(InputNotReadyError, match=r"CODE\.fd, .*VARS\.fd is missing on this node") as err:
        rec.reconcile(vm)
    assert err.value.reason == "FirmwareMissing"
    (tmp_path / "fw").mkdir()
    for name in ("CODE.fd", "VARS.fd"):
        (tmp_path / "fw" / name).write_bytes(b"\0" * 4096)
    rec.reconcile(vm)
    name = domain_name("default", vm.metadata.name)
    xml = hv.lookup(name).XMLDesc(0)  # type: ignore[union-attr]
    assert f"{tmp_path}/fw/CODE.fd</loader>" in xml
    assert f"<nvram template='{tmp_path}/fw/VARS.fd'>{layout.nvram_path(owner_of(vm))}</nvram>" in xml
    rec.reconcile(vm, deleting=True, grace_seconds=0)
    assert hv.lookup(name) is None
