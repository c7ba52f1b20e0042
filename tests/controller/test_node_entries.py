"""What a deleted Node's entry leaves of a VmNetwork's and a VmImage's status."""

import pytest

from formation_vmm.api.models import NetworkNodeStatus, VmImageStatus, VmNetworkStatus
from formation_vmm.controller.binding.networks import without_node
from formation_vmm.images import status as images

pytestmark = pytest.mark.pure


def test_a_deleted_nodes_entry_goes_and_the_count_follows() -> None:
    status = VmNetworkStatus(
        nodes=[
            NetworkNodeStatus(name="a", phase="Ready", bridge="vmm1"),
            NetworkNodeStatus(name="b", phase="Failed", bridge="vmm1"),
            NetworkNodeStatus(name="gone", phase="Ready", bridge="vmm1"),
        ],
        nodes_ready="2/3",
    )
    left = without_node(status, "gone")
    assert left is not None
    assert [n.name for n in left.nodes] == ["a", "b"] and left.nodes_ready == "1/2"
    assert without_node(left, "gone") is None  # nothing to write


def test_a_deleted_nodes_image_entry_goes_and_the_phase_follows() -> None:
    status = images.with_node(VmImageStatus(), "a", "Ready", generation=3)
    status = images.with_node(status, "gone", "Failed", "cannot reach the source", generation=3)
    assert status.phase == "Failed"
    left = images.without_node(status, "gone")
    assert left is not None
    assert [n.name for n in left.nodes] == ["a"] and left.phase == "Ready"
    ready = next(c for c in left.conditions if c.type == "Ready")
    assert (ready.status, ready.reason, ready.observed_generation) == ("True", "Imported", 3)
    assert images.without_node(left, "gone") is None  # nothing to write
