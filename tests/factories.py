"""Build test objects with overrides: ``make_vm(memory="1Gi")``."""

from typing import Any

from formation_vmm.api.models import VirtualMachine


def vm_body(name: str = "vm1", namespace: str = "default", uid: str = "uid-1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": 1},
        "spec": spec,
    }


def make_vm(name: str = "vm1", namespace: str = "default", uid: str = "uid-1", **spec: Any) -> VirtualMachine:
    return VirtualMachine.model_validate(vm_body(name, namespace, uid, **spec))
