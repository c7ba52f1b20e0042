"""The entries a deleted Node leaves in VmNetworks' status: no agent removes them, since the
node's agent, which wrote them, is gone with it."""

from typing import Any

from formation_vmm.api.models import VmNetworkStatus
from formation_vmm.controller.networks import without_node
from formation_vmm.kube import StatusWriter


def forget_node(networks: StatusWriter[VmNetworkStatus], bodies: list[dict[str, Any]], node: str) -> None:
    """A deleted Node's entries go from every VmNetwork's status: its agent, which wrote them, is
    gone with it, and `kubectl get vmnet` must not count a node that no longer exists."""
    for body in bodies:
        if without_node(networks.status_of(body), node) is None:
            continue
        networks.write(
            body,
            lambda status: without_node(status, node) or status,
        )
