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
from formation_vmm.domain.spec import BaseImage, Owner
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
    return domain_xml(build_domain_spec(vm, LAYOUT, domain_type, bases(vm)))


def bases(vm: VirtualMachine, virtual_size: int = 1 << 30, **extra: object) -> dict[str, BaseImage]:
    """Each image the VM names, as if cached on the node."""
    return {
        name: BaseImage(
            sha256="0" * 64,
            path=LAYOUT.images_dir / f"{name}.img",
            format="raw",
            size=virtual_size,
            virtual_size=virtual_size,
            **extra,  # type: ignore[arg-type]
        )
        for name in image_names(vm)
    }


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


def test_an_image_disk_is_an_overlay_in_the_vms_disk_directory() -> None:
    vm = make_vm(disks=[{"name": "root", "image": "debian", "size": "2Gi"}])
    spec = build_domain_spec(vm, LAYOUT, "kvm", bases(vm))
    assert spec.disks[0].path == LAYOUT.disk_path(vm.metadata.namespace or "", vm.metadata.name, "root")
    assert spec.disks[0].driver_type == "qcow2"


def test_an_image_disk_smaller_than_its_image_or_a_vm_below_its_minimum_is_refused() -> None:
    small = make_vm(disks=[{"name": "root", "image": "debian", "size": "512Mi"}])
    with pytest.raises(UnsupportedSpecError, match="smaller than image 'debian'"):
        build_domain_spec(small, LAYOUT, "kvm", bases(small))
    vm = make_vm(disks=[{"name": "root", "image": "debian"}])
    with pytest.raises(UnsupportedSpecError, match="at least 4 CPUs"):
        build_domain_spec(vm, LAYOUT, "kvm", bases(vm, min_cpus=4))
    with pytest.raises(UnsupportedSpecError, match="at least 64Gi of memory"):
        build_domain_spec(vm, LAYOUT, "kvm", bases(vm, min_memory="64Gi"))


def test_a_kernel_boot_needs_its_images_resolved() -> None:
    vm = make_vm(kernel={"image": "k"})
    with pytest.raises(UnsupportedSpecError, match="images not resolved: k"):
        build_domain_spec(vm, LAYOUT, "kvm", {})


def test_hostpath_images_stay_inside_the_images_dir() -> None:
    assert LAYOUT.image_path("kernels/vmlinuz") == Path("/img/kernels/vmlinuz")
    for bad in ("/etc/shadow", "../etc/shadow", "a/../../b", ""):
        with pytest.raises(UnsafeNameError):
            LAYOUT.image_path(bad)
