"""Names shared by the controller, the agent, the CRDs and the tests."""

import hashlib
import re

GROUP = "vmm.formation.cloud"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

VM_PLURAL = "virtualmachines"
VM_KIND = "VirtualMachine"
IMAGE_PLURAL = "vmimages"
IMAGE_KIND = "VmImage"
SNAPSHOT_PLURAL = "vmsnapshots"
SNAPSHOT_KIND = "VmSnapshot"
RESTORE_PLURAL = "vmrestores"
RESTORE_KIND = "VmRestore"
MIGRATION_PLURAL = "vmmigrations"
MIGRATION_KIND = "VmMigration"
NETWORK_PLURAL = "vmnetworks"
NETWORK_KIND = "VmNetwork"
# The network a VM interface joins when it names none.
DEFAULT_NETWORK = "default"
# libvirt networks the agent makes from VmNetworks: this prefix and the VmNetwork's name, so
# they never meet the host's own libvirt networks (libvirt's "default" among them).
LIBVIRT_NETWORK_PREFIX = "vmm-"

# A node runs an agent, and may receive VMs, only when it carries this label set to "true".
HYPERVISOR_LABEL = f"{GROUP}/hypervisor"
# The controller binds a VM to a node with this label (and status.nodeName); each agent watches
# only the VMs carrying its own node's name here.
NODE_LABEL = f"{GROUP}/node"

# Neither process uses kopf's per-object state (finalizer, annotations): both handle only watch
# events. The one finalizer is the agent's own, one per node: an agent never touches another's.


def _node_key(node: str) -> str:
    """The node as the name part of a finalizer: the node's own name when it fits (at most 63
    characters; node names are lower-case DNS names, which are valid there), else a digest. The
    admission policy that binds an agent to its node checks the first form exactly."""
    if len(node) <= 63 and all(c.isalnum() or c in "-." for c in node):
        return node.lower()
    return "n" + hashlib.sha256(node.encode()).hexdigest()[:16]


# The controller's, on every VmImage: held while VMs use a deleted image.
IMAGE_FINALIZER = f"{GROUP}/image-in-use"


AGENT_FINALIZER_PREFIX = f"agent.{GROUP}/"
_DIGEST_KEY = re.compile(r"n[0-9a-f]{16}")


def agent_finalizer(node: str) -> str:
    return f"{AGENT_FINALIZER_PREFIX}{_node_key(node)}"


def finalizer_node(finalizer: str) -> str | None:
    """The node an agent finalizer names; None for another finalizer, or for a digest that
    stands for a long name (the name cannot be read back, and a node named like a digest is
    taken for one: the safe side, as a caller may act on a node it thinks gone)."""
    if not finalizer.startswith(AGENT_FINALIZER_PREFIX):
        return None
    key = finalizer.removeprefix(AGENT_FINALIZER_PREFIX)
    return None if _DIGEST_KEY.fullmatch(key) else key


# Node annotations written by the agent: what the node offers to VMs.
CAPACITY_CPUS_ANNOTATION = f"{GROUP}/capacity-cpus"
CAPACITY_MEMORY_ANNOTATION = f"{GROUP}/capacity-memory"
CAPACITY_DISK_ANNOTATION = f"{GROUP}/capacity-disk"  # the disks directory's filesystem
HEARTBEAT_ANNOTATION = f"{GROUP}/agent-heartbeat"
VM_COUNT_ANNOTATION = f"{GROUP}/vms"
# How the controller reaches the node's agent for consoles and counters (JSON: the TLS port on
# the node's InternalIP, and the certificate the agent shows there). Users never read it: their
# requests end at the apiserver (docs/security.md, "Consoles and counters").
AGENT_ACCESS_ANNOTATION = f"{GROUP}/agent-access"
# How another node's agent reaches this node for a live migration (JSON: the libvirt URI the
# source's libvirtd opens, and the directory of the migration's sockets); absent on a node whose
# agent takes no migrations (docs/migration.md).
MIGRATION_ENDPOINT_ANNOTATION = f"{GROUP}/migration-endpoint"
# The public key secrets are sealed to for this node's agent (sealing.py).
AGENT_KEY_ANNOTATION = f"{GROUP}/agent-key"

# The taint `kubectl vm drain` sets on a node (and other tooling may): the controller moves the
# node's VMs away per their evictionStrategy; no VM is placed there meanwhile (NoSchedule).
DRAIN_TAINT = f"{GROUP}/drain"
# On a VM of a draining node, the controller's word on what the drain does with it (it stays,
# and why), for `kubectl vm drain` to show; on the migrations the drain creates, the node.
EVICTION_ANNOTATION = f"{GROUP}/eviction"
DRAIN_LABEL = f"{GROUP}/drain"
# On a VM the controller restarts elsewhere (a drain's Restart): the node whose agent stops it
# first. The controller binds it to another node once it is stopped, and removes this in the same
# write; only the controller may set it (the placement policy).
RESTART_ELSEWHERE_ANNOTATION = f"{GROUP}/restart-elsewhere"
# The taint an admin sets on a node that is shut down for good (Kubernetes' non-graceful node
# shutdown): with its agent silent, its VMs that allow it are started on other nodes.
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"

# VM annotation the controller writes in the binding: the addresses it assigned, the record of
# IPAM (``iface=network/address`` joined by commas; only the controller may set it).
ADDRESSES_ANNOTATION = f"{GROUP}/addresses"
# The MACs the controller gave the VM's interfaces that name none (``iface=mac`` joined by
# commas): unique on each network, kept for the VM's life. Only the controller may set it.
MACS_ANNOTATION = f"{GROUP}/macs"
# The uid and gid the VM's QEMU runs as (qemu_uids.py): given at binding, kept for the VM's life.
# Only the controller may set it.
QEMU_UID_ANNOTATION = f"{GROUP}/qemu-uid"
# What the controller admitted of a bound VM's spec (api/admission.py): the digest of the
# placement-relevant fields and the resources counted for it. A spec whose digest differs is
# held: the agent keeps running the VM as admitted. Only the controller may set it.
ADMITTED_ANNOTATION = f"{GROUP}/admitted"

# libvirt <metadata> namespace in which the agent records which VM owns a domain.
LIBVIRT_METADATA_NS = f"https://{GROUP}/domain"
LIBVIRT_METADATA_PREFIX = "vmm"


def libvirt_network(vmnetwork: str) -> str:
    """The libvirt network a VmNetwork becomes on each node."""
    return LIBVIRT_NETWORK_PREFIX + vmnetwork


def bridge_device(vmnetwork: str) -> str:
    """The bridge device of a nat or isolated VmNetwork: a digest of its name, so it fits
    Linux's 15 characters and never collides with an admin's own bridges (virbr*, br*)."""
    return "vmm" + hashlib.sha256(vmnetwork.encode()).hexdigest()[:10]


# The aggregated API the controller serves behind the apiserver: VMs' consoles and counters
# (`kubectl vm console`, `kubectl vm top`), authorised by the apiserver as subresources of
# ``virtualmachines`` in this group, as KubeVirt's subresources.kubevirt.io.
SUBRESOURCES_GROUP = f"subresources.{GROUP}"
SUBRESOURCES_VERSION = "v1"
SUBRESOURCES_API_SERVICE = f"{SUBRESOURCES_VERSION}.{SUBRESOURCES_GROUP}"
# The Service the APIService names, and the Secret of the certificate the controller serves it
# with (the APIService's caBundle; agents trust exactly it for their side).
SUBRESOURCES_SERVICE = "formation-vmm-subresources"
SUBRESOURCES_SECRET = "formation-vmm-subresources-tls"  # noqa: S105 - a name
