"""What KubeNode refuses before it starts anything."""

from pathlib import Path

import pytest

from formation_vmm.devcluster.kube_node import SOCKET_PATH_MAX, KubeNode, KubeNodeError
from formation_vmm.devcluster.processes import ProcessTable

pytestmark = pytest.mark.pure


def test_a_directory_too_long_for_containerds_socket_is_refused_with_the_way_out(tmp_path: Path) -> None:
    root = tmp_path / ("d" * SOCKET_PATH_MAX)
    node = KubeNode(root, "node-k", "vmm-test", ProcessTable(tmp_path / "pids.json"))
    with pytest.raises(KubeNodeError, match=r"over 104 bytes.*VMM_DEV_DIR"):
        node._start_containerd()
    assert not (tmp_path / "pids.json").exists()  # nothing was started
