"""Build test objects with overrides: ``make_vm(memory="1Gi")``."""

from typing import Any

from formation_vmm.api.models import VirtualMachine
from formation_vmm.domain.spec import BaseImage


def vm_body(name: str = "vm1", namespace: str = "default", uid: str = "uid-1", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": 1},
        "spec": spec,
    }


def make_vm(name: str = "vm1", namespace: str = "default", uid: str = "uid-1", **spec: Any) -> VirtualMachine:
    return VirtualMachine.model_validate(vm_body(name, namespace, uid, **spec))


class InlineInputs:
    """Inputs for a reconciler driven without a cluster: the images given (none by default),
    user data inline. (The agent's own ClusterInputs reads VmImages and Secrets from the API.)"""

    def __init__(self, images: dict[str, BaseImage] | None = None) -> None:
        self._images = images or {}

    def images(self, vm: VirtualMachine) -> dict[str, BaseImage]:
        return dict(self._images)

    def user_data(self, vm: VirtualMachine) -> str:
        return (vm.spec.cloud_init.user_data or "") if vm.spec.cloud_init else ""
