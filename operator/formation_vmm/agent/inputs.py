"""What a VM's domain needs from outside its spec: image files and cloud-init user data.

Reads the Kubernetes API (VmImages, Secrets) and the node's images directory. Kept behind a
small protocol so the reconciler can be driven in tests with files only.
"""

import base64
import hashlib
import threading
from pathlib import Path
from typing import Any, Protocol

from kubernetes import client

from formation_vmm.agent.files import UnsafePathError, ensure_inside
from formation_vmm.api.models import VirtualMachine, VmImage
from formation_vmm.api.names import GROUP, IMAGE_PLURAL, VERSION
from formation_vmm.domain.build import image_names
from formation_vmm.domain.layout import NodeLayout


class InputNotReadyError(RuntimeError):
    """An image or secret the VM needs is not (yet) usable; the message says which and why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Inputs(Protocol):
    def images(self, vm: VirtualMachine) -> dict[str, Path]: ...

    def user_data(self, vm: VirtualMachine) -> str: ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


class ClusterInputs:
    """Images from hostPath VmImages (download and conversion arrive with the images work),
    user data inline or from a Secret in the VM's namespace."""

    def __init__(
        self,
        layout: NodeLayout,
        custom: client.CustomObjectsApi,
        core: client.CoreV1Api,
        catalog: ImageCatalog | None = None,
    ) -> None:
        self.layout = layout
        self.custom = custom
        self.core = core
        self.catalog = catalog or ImageCatalog()
        self._verified: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256
        self._lock = threading.Lock()

    def _get_image(self, namespace: str, name: str) -> VmImage:
        seen = self.catalog.get(namespace, name)
        if seen is not None:
            return seen
        # Not seen (yet): the watch may lag behind a VmImage created a moment ago.
        try:
            raw: Any = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, IMAGE_PLURAL, name)
        except client.ApiException as exc:
            if exc.status == 404:
                raise InputNotReadyError(
                    "ImageNotFound", f"VmImage {namespace}/{name} does not exist"
                ) from exc
            raise
        return VmImage.model_validate(raw)

    def _checksum(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._verified.get(key)
        if known is None:
            known = sha256_file(path)
            with self._lock:
                self._verified[key] = known
        return known

    def images(self, vm: VirtualMachine) -> dict[str, Path]:
        namespace = vm.metadata.namespace or ""
        found: dict[str, Path] = {}
        for name in image_names(vm):
            image = self._get_image(namespace, name)
            source = image.spec.source
            if source.host_path is None:
                raise InputNotReadyError(
                    "ImageSourceUnsupported",
                    f"VmImage {name} downloads over HTTP; this agent uses hostPath images only so far",
                )
            try:
                path = self.layout.image_path(source.host_path.path)
                ensure_inside(self.layout.images_dir, path)
            except (ValueError, UnsafePathError) as exc:
                raise InputNotReadyError("ImagePathRefused", f"VmImage {name}: {exc}") from exc
            if not path.is_file():
                raise InputNotReadyError(
                    "ImageMissing", f"VmImage {name}: {source.host_path.path} is not on this node"
                )
            if image.spec.checksum and f"sha256:{self._checksum(path)}" != image.spec.checksum:
                raise InputNotReadyError(
                    "ChecksumMismatch", f"VmImage {name}: {path.name} does not match its checksum"
                )
            found[name] = path
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
            secret = self.core.read_namespaced_secret(ref.name, namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                raise InputNotReadyError(
                    "SecretNotFound", f"Secret {namespace}/{ref.name} does not exist"
                ) from exc
            raise
        data = (secret.data or {}).get(ref.key)
        if data is None:
            raise InputNotReadyError(
                "SecretKeyMissing", f"Secret {namespace}/{ref.name} has no key {ref.key!r}"
            )
        return base64.b64decode(data).decode()
