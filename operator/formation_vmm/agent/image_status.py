"""Writes this node's entry of a VmImage's status (see ``images.status`` for the merge)."""

from typing import Any

from formation_vmm.api.models import VmImage
from formation_vmm.images.status import node_entry, with_node
from formation_vmm.kube import StatusWriter


class ImageStatusReporter:
    def __init__(self, writer: StatusWriter, node: str) -> None:
        self.writer = writer
        self.node = node

    def __call__(self, image: VmImage, phase: str, message: str | None, details: dict[str, Any]) -> None:
        fresh = self.writer.get_or_none(image.metadata.namespace or "", image.metadata.name)
        if fresh is None or fresh["metadata"].get("uid") != image.metadata.uid:
            return  # deleted (or deleted and re-created): nothing of ours to report on
        status = dict(fresh.get("status") or {})
        entry = node_entry(status, self.node)
        unchanged = entry == ({"name": self.node, "phase": phase} | ({"message": message} if message else {}))
        if unchanged and all(status.get(k) == v for k, v in details.items()):
            return
        generation = fresh["metadata"].get("generation")
        self.writer.write(fresh, lambda st: with_node(st, self.node, phase, message, details, generation))
