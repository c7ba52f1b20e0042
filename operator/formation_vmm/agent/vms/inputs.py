"""What a VM's domain needs from outside its spec: image files and cloud-init user data.

Reads the Kubernetes API (VmImages, Secrets) and the node's image cache. Kept behind a small
protocol so the reconciler can be driven in tests with files only.
"""

from collections.abc import Callable
from typing import Protocol

from formation_vmm.api.models import SealedValue, VirtualMachine, VmImage
from formation_vmm.api.names import IMAGE_PLURAL
from formation_vmm.domain.build import needed_images
from formation_vmm.domain.spec import BaseImage
from formation_vmm.images.fetch import FetchError
from formation_vmm.images.node import ImageNotReadyError, NodeImages
from formation_vmm.informer import Informer
from formation_vmm.kube import Kube
from formation_vmm.sealing import NodeKey, SealError, image_context, user_data_context


class InputNotReadyError(RuntimeError):
    """An image, secret or network the VM needs is not (yet) usable; the message says which and
    why, ``condition`` which condition turns False with it."""

    def __init__(self, reason: str, message: str, condition: str = "ImageReady") -> None:
        super().__init__(message)
        self.reason = reason
        self.condition = condition


class Inputs(Protocol):
    def images(self, vm: VirtualMachine) -> dict[str, BaseImage]: ...

    def user_data(self, vm: VirtualMachine) -> str: ...


class ImageCatalog:
    """The VmImages as the images' informer has them, so a sync reads them from memory, not the
    API: a view of its store, typed."""

    def __init__(self, images: Informer) -> None:
        self.images = images

    def get(self, namespace: str, name: str) -> VmImage | None:
        body = self.images.get(f"{namespace}/{name}")
        return VmImage.model_validate(body) if body is not None else None

    def all(self) -> list[VmImage] | None:
        """Every VmImage; None until the informer's first list is in (an empty store then says
        nothing of what exists)."""
        if not self.images.synced.is_set():
            return None
        return [VmImage.model_validate(body) for body in self.images.store.items()]


class ClusterInputs:
    """Images through the node's image manager (which fetches, verifies and caches them), user
    data inline or, from a Secret, as the controller sealed it for this node (sealing.py)."""

    def __init__(
        self, kube: Kube, node_images: NodeImages, catalog: ImageCatalog, key: NodeKey, node: str
    ) -> None:
        self.kube = kube
        self.node_images = node_images
        self.catalog = catalog
        self.key = key
        self.node = node

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
        for name in needed_images(vm):
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
        context = user_data_context(namespace, vm.metadata.name, vm.metadata.uid or "", ref.name, ref.key)
        what = f"Secret {namespace}/{ref.name} (key {ref.key!r})"
        return open_sealed(vm.status.sealed_user_data, self.key, self.node, context, what).decode()


def open_sealed(sealed: SealedValue | None, key: NodeKey, node: str, context: str, what: str) -> bytes:
    """The value the controller sealed for this node, or why the VM or image must wait."""
    if sealed is None or sealed.node != node:
        raise InputNotReadyError("SecretNotSealed", f"waiting for the controller to hand this node {what}")
    if sealed.error is not None:
        reason = "SecretNotFound" if "does not exist" in sealed.error else "SecretNotSealed"
        raise InputNotReadyError(reason, sealed.error)
    if sealed.data is None or sealed.key_id != key.id:
        raise InputNotReadyError(
            "SecretNotSealed", f"waiting for the controller to seal {what} to this node's current key"
        )
    try:
        return key.open(sealed.data, context)
    except SealError as exc:
        raise InputNotReadyError("SecretNotSealed", f"{what}: {exc}") from exc


def image_authorization(key: NodeKey, node: str) -> Callable[[VmImage], str]:
    """The Authorization header value a VmImage's secretRef names, as sealed for this node."""

    def read(image: VmImage) -> str:
        http = image.spec.source.http
        ref = http.secret_ref if http is not None else None
        assert ref is not None
        namespace = image.metadata.namespace or ""
        context = image_context(namespace, image.metadata.name, image.metadata.uid or "", ref.name, ref.key)
        sealed = next((c for c in image.status.credentials if c.node == node), None)
        what = f"Secret {namespace}/{ref.name} (key {ref.key!r})"
        try:
            return open_sealed(sealed, key, node, context, what).decode().strip()
        except InputNotReadyError as exc:
            raise FetchError(exc.reason, str(exc)) from exc

    return read
