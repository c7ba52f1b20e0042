"""Which VmImages a VM's raw body names (disk images, kernel, initrd), for the watch paths that
see bodies, not models. ``domain.build.needed_images`` is the same, in order, on a validated model."""

from typing import Any


def referenced_images(body: dict[str, Any]) -> set[str]:
    spec = body.get("spec") or {}
    kernel = spec.get("kernel") or {}
    names = {kernel.get("image"), kernel.get("initrd")} | {d.get("image") for d in spec.get("disks") or []}
    return {n for n in names if n}
