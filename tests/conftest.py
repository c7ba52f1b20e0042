"""Tiers: every test module carries exactly one of the markers pure, host, libvirt, controlplane,
guest (a real distribution booted on TCG: minutes), node (a real kubelet node and `helm
install` of the image built here: minutes). `hack/test -m "not guest and not node"` skips the
slow two locally; CI never does."""

import pytest

TIERS = {"pure", "host", "libvirt", "controlplane", "guest", "node"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = {m.name for m in item.iter_markers()} & TIERS
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid} must carry exactly one tier marker of {sorted(TIERS)}")


# Shared fixtures, by name: the real-QEMU node, the control plane, the fleet.
from tests.support.cluster import control_plane, kubectl, ns  # noqa: E402, F401
from tests.support.fleet import fleet  # noqa: E402, F401
from tests.support.networks import make_network  # noqa: E402, F401
from tests.support.nodes import qemu_node  # noqa: E402, F401
