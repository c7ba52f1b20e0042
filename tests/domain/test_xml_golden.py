"""Domain XML golden files: ``golden/<case>-in.yaml`` -> ``golden/<case>-out.xml``.

Regenerate after an intended change with ``VMM_UPDATE_GOLDEN=1 hack/test tests/domain`` and
review the diff.
"""

import os
from pathlib import Path

import pytest
import yaml

from formation_vmm.api.models import VirtualMachine
from formation_vmm.domain.build import UnsupportedSpecError, build_domain_spec, image_names
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import UnsafeNameError, domain_name, stable_mac
from formation_vmm.domain.spec import Owner
from formation_vmm.domain.xml import domain_xml, metadata_of
from tests.factories import make_vm

pytestmark = pytest.mark.pure

GOLDEN = Path(__file__).parent / "golden"
LAYOUT = NodeLayout(
    vm_dir=Path("/run/form-vm"), disks_dir=Path("/var/lib/formation/vm-disks"), images_dir=Path("/img")
)
CASES = sorted(p.name.removesuffix("-in.yaml") for p in GOLDEN.glob("*-in.yaml"))


def render(case: str, domain_type: str = "kvm") -> str:
    vm = VirtualMachine.model_validate(yaml.safe_load((GOLDEN / f"{case}-in.yaml").read_text()))
    images = {name: LAYOUT.images_dir / f"{name}.img" for name in image_names(vm)}
    return domain_xml(build_domain_spec(vm, LAYOUT, domain_type, images))


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    out = GOLDEN / f"{case}-out.xml"
    got = render(case)
    if os.environ.get("VMM_UPDATE_GOLDEN"):
        out.write_text(got)
    assert got == out.read_text()


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 2


def test_owner_round_trips_through_the_xml() -> None:
    xml = render("basic")
    meta = metadata_of(xml)
    assert meta is not None
    assert meta.owner == Owner(namespace="prod", name="web", uid="0b6f8a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
    assert meta.spec_hash is not None and len(meta.spec_hash) == 16


def test_a_domain_without_our_metadata_has_no_owner() -> None:
    assert metadata_of("<domain type='kvm'><name>other</name></domain>") is None
    assert metadata_of("not xml") is None


def test_mac_is_stable_and_local() -> None:
    mac = stable_mac("uid-1", "eth0")
    assert mac == stable_mac("uid-1", "eth0")
    assert mac != stable_mac("uid-2", "eth0")
    assert mac.startswith("52:54:00:")


def test_names_from_manifests_cannot_escape_into_paths() -> None:
    with pytest.raises(UnsafeNameError):
        LAYOUT.disk_path("default", "vm", "../../etc/passwd")
    with pytest.raises(UnsafeNameError):
        domain_name("default", "a/b")
    with pytest.raises(UnsafeNameError):
        build_domain_spec(make_vm(disks=[{"name": "Bad_Name", "size": "1Gi"}]), LAYOUT, "kvm")


def test_image_disks_are_refused_until_images_exist() -> None:
    with pytest.raises(UnsupportedSpecError, match="does not import images yet"):
        build_domain_spec(make_vm(disks=[{"name": "root", "image": "debian"}]), LAYOUT, "kvm")


def test_a_kernel_boot_needs_its_images_resolved() -> None:
    vm = make_vm(kernel={"image": "k"})
    with pytest.raises(UnsupportedSpecError, match="images not resolved: k"):
        build_domain_spec(vm, LAYOUT, "kvm", {})


def test_hostpath_images_stay_inside_the_images_dir() -> None:
    assert LAYOUT.image_path("kernels/vmlinuz") == Path("/img/kernels/vmlinuz")
    for bad in ("/etc/shadow", "../etc/shadow", "a/../../b", ""):
        with pytest.raises(UnsafeNameError):
            LAYOUT.image_path(bad)
