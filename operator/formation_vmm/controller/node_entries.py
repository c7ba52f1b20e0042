"""The entries a deleted Node leaves in VmNetworks' and VmImages' status: no agent removes
them, since the node's agent, which wrote them, is gone with it."""

from typing import Any

from formation_vmm.api.models import VmImageStatus, VmNetworkStatus
from formation_vmm.controller.binding import networks
from formation_vmm.images import status as images
from formation_vmm.kube import StatusWriter

Body = dict[str, Any]


def forget_node_networks(writer: StatusWriter[VmNetworkStatus], bodies: list[Body], node: str) -> None:
    """A deleted Node's entries go from every VmNetwork's status: `kubectl get vmnet` must not
    count a node that no longer exists."""
    for body in bodies:
        if networks.without_node(writer.status_of(body), node) is not None:
            writer.write(body, lambda status: networks.without_node(status, node) or status)


def forget_node_images(writer: StatusWriter[VmImageStatus], bodies: list[Body], node: str) -> None:
    """A deleted Node's entries go from every VmImage's status, and the image's phase is
    recomputed without them: an import that failed on a node that is gone fails it no more."""
    for body in bodies:
        if images.without_node(writer.status_of(body), node) is not None:
            writer.write(body, lambda status: images.without_node(status, node) or status)
