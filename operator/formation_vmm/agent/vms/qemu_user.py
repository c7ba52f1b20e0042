"""Who the node's QEMUs run as: a uid of each VM's own (qemu_uids.py) when the VMs' files can be
reached by one, and the group that opens /dev/kvm."""

import logging
import os
import stat
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


def own_uids_possible(tops: Iterable[Path]) -> bool:
    """Whether a QEMU running as a uid of its own reaches the VM's files under ``tops``: every
    directory above them lets others through (the chart's and the manifests' do; a dev cluster
    under a home directory may not). Otherwise each VM's QEMU runs as the node's QEMU user, said
    here."""
    for top in tops:
        closed = [d for d in [top, *top.parents] if d.exists() and not d.stat().st_mode & stat.S_IXOTH]
        if closed:
            log.warning(
                "each VM's QEMU runs as the node's QEMU user, not a uid of its own: %s lets no "
                "other user through (docs/security.md)",
                closed[0],
            )
            return False
    return True


def kvm_group(configured: int | None) -> int | None:
    """The group each QEMU runs in: as configured, else the one that owns /dev/kvm."""
    if configured is not None:
        return configured
    try:
        return os.stat("/dev/kvm").st_gid
    except OSError:
        return None
