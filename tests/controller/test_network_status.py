"""What a deleted Node's entry leaves of a VmNetwork's status."""

import pytest

from formation_vmm.api.models import NetworkNodeStatus, VmNetworkStatus
from formation_vmm.controller.networks import without_node

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
