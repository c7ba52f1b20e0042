"""The agent's reconciler against libvirt's test driver: real libvirt, no guest."""

import uuid
from pathlib import Path

import libvirt
import pytest

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.plan import Action, DomainState
from formation_vmm.agent.reconcile import Reconciler
from formation_vmm.agent.status import status_after
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from tests.domain.test_xml_golden import CASES, render
from tests.factories import make_vm

pytestmark = pytest.mark.libvirt

URI = "test:///default"


@pytest.fixture
def layout(tmp_path: Path) -> NodeLayout:
    return NodeLayout(vm_dir=tmp_path / "run", disks_dir=tmp_path / "disks", images_dir=tmp_path / "images")


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
    rec = Reconciler(hv, layout, "test")
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
    assert (layout.disk_path("default", name, "data")).exists()
    status = status_after(vm, {}, out, "node-a")
    assert status["phase"] == "Running" and status["startedAt"] and status["domainUUID"] == out.domain.uuid

    # Reconciling again changes nothing: idempotent.
    assert rec.reconcile(vm).actions == []

    paused = vm.model_copy(update={"spec": vm.spec.model_copy(update={"paused": True})})
    assert rec.reconcile(paused).actions == [Action.SUSPEND]
    assert hv.describe(dom).actual.state is DomainState.PAUSED  # type: ignore[union-attr]
    assert rec.reconcile(vm).actions == [Action.RESUME]

    halted = vm.model_copy(update={"spec": vm.spec.model_copy(update={"run_strategy": "Halted"})})
    assert rec.reconcile(halted).actions == [Action.SHUTDOWN]
    assert hv.describe(dom).actual.state is DomainState.SHUTOFF  # type: ignore[union-attr]

    out = rec.reconcile(vm, deleting=True)
    assert out.domain is None
    assert not layout.disk_dir("default", name).exists()
    assert not layout.runtime_dir("default", name).exists()


def test_a_stale_domain_of_an_older_vm_with_the_same_name_is_replaced(
    hv: Hypervisor, layout: NodeLayout
) -> None:
    rec = Reconciler(hv, layout, "test")
    name = fresh_name()
    old = make_vm(name=name, uid="old-uid")
    new = make_vm(name=name, uid="new-uid")
    rec.reconcile(old)
    out = rec.reconcile(new)
    assert out.domain is not None and out.domain.owner is not None
    assert out.domain.owner.uid == "new-uid"
    rec.reconcile(new, deleting=True)


def test_owned_domains_are_found_by_metadata_not_by_name(hv: Hypervisor, layout: NodeLayout) -> None:
    rec = Reconciler(hv, layout, "test")
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
    layout.disks_dir.joinpath("default").mkdir(parents=True)
    layout.disk_dir("default", name).symlink_to(outside)
    rec = Reconciler(hv, layout, "test")
    vm = make_vm(name=name, uid=str(uuid.uuid4()), disks=[{"name": "data", "size": "1Mi"}])
    with pytest.raises(RuntimeError, match="outside"):
        rec.reconcile(vm)
    rec.reconcile(vm, deleting=True)
    assert (outside / "precious").read_text() == "keep me"
