"""What the controller's VM informer keeps of each VM (the controller's one per-VM record
besides the binder's sums), and the store's indexes the sealer and the image guard read."""

from collections.abc import Hashable, Iterable
from typing import Any

from formation_vmm.api.names import NODE_LABEL
from formation_vmm.api.references import referenced_images

Body = dict[str, Any]

BY_IMAGE = "image"  # (namespace, VmImage): the VMs that name it
SEALING = "sealing"  # True: bound VMs, not being deleted, whose user data comes from a Secret


def vm_facts(body: Body) -> Body:
    """What the controller's VM informer keeps of a VM, in the shape of a VM: who it is, its
    node, whether it is going, where its user data comes from and how it was sealed, and the
    images it names (``images``, beside the VM's own fields). Never its whole body: the binder
    keeps the sums it needs (docs/decisions.md)."""
    meta = body["metadata"]
    kept: Body = {
        "metadata": {
            key: meta[key]
            for key in ("uid", "namespace", "name", "resourceVersion", "deletionTimestamp")
            if key in meta
        },
        "images": sorted(referenced_images(body)),
    }
    node = (meta.get("labels") or {}).get(NODE_LABEL)
    if node:
        kept["metadata"]["labels"] = {NODE_LABEL: node}
    ref = ((body.get("spec") or {}).get("cloudInit") or {}).get("userDataSecretRef")
    if ref:
        kept["spec"] = {"cloudInit": {"userDataSecretRef": ref}}
    sealed = (body.get("status") or {}).get("sealedUserData")
    if sealed:
        kept["status"] = {"sealedUserData": sealed}
    return kept


def node_of(facts: Body) -> str | None:
    return (facts["metadata"].get("labels") or {}).get(NODE_LABEL)


def images_of(facts: Body) -> Iterable[Hashable]:
    """The index BY_IMAGE: (namespace, VmImage) of each image the VM names."""
    namespace = facts["metadata"].get("namespace", "")
    return [(namespace, image) for image in facts.get("images") or []]


def sealing(facts: Body) -> Iterable[Hashable]:
    """The index SEALING: True for a bound VM, not being deleted, with a user-data Secret."""
    bound = node_of(facts) is not None and not facts["metadata"].get("deletionTimestamp")
    return [True] if bound and facts.get("spec") else []


INDEXERS = {BY_IMAGE: images_of, SEALING: sealing}
