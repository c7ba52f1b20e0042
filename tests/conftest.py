"""Tiers: every test module carries exactly one of the markers pure, host, libvirt, controlplane."""

import pytest

TIERS = {"pure", "host", "libvirt", "controlplane"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = {m.name for m in item.iter_markers()} & TIERS
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid} must carry exactly one tier marker of {sorted(TIERS)}")


from tests.support.nodes import qemu_node  # noqa: E402, F401
