"""What a VM's domain needs from outside its spec: image files and cloud-init user data.

Reads the Kubernetes API (VmImages, Secrets) and the node's image cache. Kept behind a small
protocol so the reconciler can be driven in tests with files only.
"""

import base64
import threading
from collections.abc import Callable
from typing import Any, Protocol

from formation_vmm.api.models import VirtualMachine, VmImage
from formation_vmm.api.names import IMAGE_PLURAL
from formation_vmm.domain.build import image_names
from formation_vmm.domain.spec import BaseImage
from formation_vmm.images.fetch import FetchError
from formation_vmm.images.node import ImageNotReadyError, NodeImages
from formation_vmm.kube import Kube, NotFoundError


class InputNotReadyError(RuntimeError):
    """An image or secret the VM needs is not (yet) usable; the message says which and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Inputs(Protocol):
    def images(self, vm: VirtualMachine) -> dict[str, BaseImage]: ...

    def user_data(self, vm: VirtualMachine) -> str: ...


class ImageCatalog:
    """The VmImages the agent's watch has seen, so a sync reads them from memory, not the API."""

    def __init__(self) -> None:
        self._images: dict[tuple[str, str], VmImage] = {}
        self._lock = threading.Lock()

    def observe(self, event_type: str | None, body: dict[str, Any]) -> VmImage:
        image = VmImage.model_validate(body)
        key = (image.metadata.namespace or "", image.metadata.name)
        with self._lock:
            if event_type == "DELETED":
                self._images.pop(key, None)
            else:
                self._images[key] = image
        return image

    def get(self, namespace: str, name: str) -> VmImage | None:
        with self._lock:
            return self._images.get((namespace, name))

    def all(self) -> list[VmImage]:
        with self._lock:
            return list(self._images.values())


class ClusterInputs:
    """Images through the node's image manager (which fetches, verifies and caches them), user
    data inline or from a Secret in the VM's namespace."""

    def __init__(self, kube: Kube, node_images: NodeImages, catalog: ImageCatalog) -> None:
        self.kube = kube
        self.node_images = node_images
        self.catalog = catalog

    def _get_image(self, namespace: str, name: str) -> VmImage:
        seen = self.catalog.get(namespace, name)
        if seen is not None:
            return seen
        # Not seen (yet): the watch may lag behind a VmImage created a moment ago.
        raw = self.kube.get_or_none(IMAGE_PLURAL, namespace, name)
        if raw is None:
            raise InputNotReadyError("ImageNotFound", f"VmImage {namespace}/{name} does not exist")
        return VmImage.model_validate(raw)

    def images(self, vm: VirtualMachine) -> dict[str, BaseImage]:
        namespace = vm.metadata.namespace or ""
        found: dict[str, BaseImage] = {}
        for name in image_names(vm):
            image = self._get_image(namespace, name)
            if image.metadata.deletion_timestamp is not None and vm.status.started_at is None:
                raise InputNotReadyError("ImageDeleting", f"VmImage {name} is being deleted")
            try:
                found[name] = self.node_images.ensure(image)
            except ImageNotReadyError as exc:
                raise InputNotReadyError(exc.reason, str(exc)) from exc
        return found

    def user_data(self, vm: VirtualMachine) -> str:
        cloud_init = vm.spec.cloud_init
        if cloud_init is None:
            return ""
        if cloud_init.user_data is not None:
            return cloud_init.user_data
        ref = cloud_init.user_data_secret_ref
        if ref is None:
            return ""
        namespace = vm.metadata.namespace or ""
        try:
            data = self.kube.secret_data(namespace, ref.name).get(ref.key)
        except NotFoundError as exc:
            raise InputNotReadyError(
                "SecretNotFound", f"Secret {namespace}/{ref.name} does not exist"
            ) from exc
        if data is None:
            raise InputNotReadyError(
                "SecretKeyMissing", f"Secret {namespace}/{ref.name} has no key {ref.key!r}"
            )
        return base64.b64decode(data).decode()


def secret_authorization(kube: Kube) -> Callable[[str, str, str], str]:
    """The Authorization header value a VmImage's secretRef names, read when an import starts."""

    def read(namespace: str, secret: str, key: str) -> str:
        try:
            data = kube.secret_data(namespace, secret).get(key)
        except NotFoundError as exc:
            raise FetchError("SecretNotFound", f"Secret {namespace}/{secret} does not exist") from exc
        if data is None:
            raise FetchError("SecretKeyMissing", f"Secret {namespace}/{secret} has no key {key!r}")
        return base64.b64decode(data).decode().strip()

    return read
