"""Writes this node's entry of a VmImage's status (see ``images.status`` for the merge)."""

from formation_vmm.api.models import ImageNodeStatus, ImagePhase, VmImage, VmImageStatus
from formation_vmm.images.status import node_entry, with_node
from formation_vmm.kube import StatusWriter


class ImageStatusReporter:
    def __init__(self, writer: StatusWriter[VmImageStatus], node: str) -> None:
        self.writer = writer
        self.node = node

    def __call__(
        self, image: VmImage, phase: ImagePhase, message: str | None, details: VmImageStatus
    ) -> None:
        fresh = self.writer.get_or_none(image.metadata.namespace, image.metadata.name)
        if fresh is None or fresh["metadata"].get("uid") != image.metadata.uid:
            return  # deleted (or deleted and re-created): nothing of ours to report on
        status = self.writer.status_of(fresh)
        wanted = ImageNodeStatus(name=self.node, phase=phase, message=message or None)
        entry = node_entry(status, self.node)
        same_entry = entry is not None and (entry.phase, entry.message) == (wanted.phase, wanted.message)
        same_details = all(getattr(status, k) == getattr(details, k) for k in details.model_fields_set)
        if same_entry and same_details:
            return
        generation = fresh["metadata"].get("generation")
        self.writer.write(fresh, lambda st: with_node(st, self.node, phase, message, details, generation))
