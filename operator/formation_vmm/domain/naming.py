"""Names the agent derives from a VM: domain names and file names (MACs: macs.py).

Everything here is pure and deterministic, so a restarted agent derives the same names again.
"""

import re

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class UnsafeNameError(ValueError):
    """A name from a manifest that may not become a file or device name on the node."""


def require_label(value: str, what: str) -> str:
    """Return ``value`` if it is a DNS-1123 label (the CRD's rule, checked again on the node)."""
    if len(value) > 63 or not _DNS1123_LABEL.match(value):
        raise UnsafeNameError(f"{what} {value!r} is not a DNS-1123 label")
    return value


def require_object_name(value: str, what: str) -> str:
    """Return ``value`` if it is a Kubernetes object name (DNS-1123 subdomain)."""
    if len(value) > 253 or not _DNS1123_SUBDOMAIN.match(value):
        raise UnsafeNameError(f"{what} {value!r} is not a valid object name")
    return value


def domain_name(namespace: str, name: str) -> str:
    """libvirt domain name of a VM; '_' cannot occur in either part, so the pair is unambiguous.

    The name is for humans running ``virsh list``; ownership is read from the domain's metadata.
    """
    return f"{require_label(namespace, 'namespace')}_{require_object_name(name, 'VM name')}"
