"""The disk names a VmSnapshot's status records are data from the API: the agent joins them to
a path only as a disk's name (issue 26, finding 13). Status is written by our service accounts
only (tests/security/test_status_forgery.py); this is the agent's own check behind that."""

from pathlib import Path

import pytest

from formation_vmm.agent.snapshots.node_snapshots import SnapshotError, recorded_disks
from formation_vmm.api.models import VmSnapshot
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.spec import Owner

pytestmark = pytest.mark.pure


def snapshot(disks: list[str]) -> VmSnapshot:
    return VmSnapshot.model_validate(
        {"metadata": {"name": "s1", "namespace": "t"}, "spec": {"vmName": "web"}, "status": {"disks": disks}}
    )


def test_recorded_disks_are_the_vms_own_files(tmp_path: Path) -> None:
    layout = NodeLayout(tmp_path / "run", tmp_path / "disks", tmp_path / "images", tmp_path / "cache")
    owner = Owner(namespace="t", name="web", uid="u1")
    assert recorded_disks(layout, owner, snapshot(["root", "data-1"])) == [
        layout.disk_path(owner, "root"),
        layout.disk_path(owner, "data-1"),
    ]
    for forged in ("../../../etc/shadow", "root/../../x", "/etc/passwd", ".hidden", ""):
        with pytest.raises(SnapshotError, match="records an unusable disk"):
            recorded_disks(layout, owner, snapshot(["root", forged]))
