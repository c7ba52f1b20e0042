"""The domain XML golden cases (``tests/domain/golden/<case>-in.yaml`` -> ``<case>-out.xml``)."""

from pathlib import Path

import yaml

from formation_vmm.api.models import VirtualMachine
from formation_vmm.domain.build import build_domain_spec, needed_images
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.spec import BaseImage
from formation_vmm.domain.xml import domain_xml

GOLDEN = Path(__file__).resolve().parents[1] / "domain" / "golden"
LAYOUT = NodeLayout(
    vm_dir=Path("/run/form-vm"),
    disks_dir=Path("/var/lib/formation/vm-disks"),
    images_dir=Path("/img"),
    cache_dir=Path("/var/lib/formation/image-cache"),
)
CASES = sorted(p.name.removesuffix("-in.yaml") for p in GOLDEN.glob("*-in.yaml"))


def golden_vm(case: str) -> VirtualMachine:
    return VirtualMachine.model_validate(yaml.safe_load((GOLDEN / f"{case}-in.yaml").read_text()))


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
        for name in needed_images(vm)
    }


def render(case: str, domain_type: str = "kvm") -> str:
    vm = golden_vm(case)
    return domain_xml(build_domain_spec(vm, LAYOUT, domain_type, bases(vm)))
