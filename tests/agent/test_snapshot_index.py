"""The agent's count of each VM's VmSnapshots, from their watch's events (LiveMigratable)."""

from typing import Any

import pytest

from formation_vmm.agent.snapshots.snapshot_index import SnapshotIndex

pytestmark = pytest.mark.pure


def snap(name: str, vm: str, namespace: str = "t1", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    return {"metadata": meta, "spec": {"vmName": vm}}


def test_counts_follow_the_watch_and_say_which_vm_changed() -> None:
    index = SnapshotIndex()
    index.load([snap("a", "web"), snap("b", "web"), snap("c", "web", namespace="t2")])
    assert (index.count("t1", "web"), index.count("t2", "web"), index.count("t1", "db")) == (2, 1, 0)
    # The listing's objects come again down the watch: no change, no sync asked for.
    assert index.observe(None, snap("a", "web")) is None
    assert index.observe("MODIFIED", snap("a", "web")) is None
    # Being deleted, it no longer counts (as for the controller's refusal); gone, nothing changes.
    assert index.observe("MODIFIED", snap("a", "web", deleting=True)) == ("t1", "web")
    assert index.count("t1", "web") == 1
    assert index.observe("DELETED", snap("a", "web", deleting=True)) is None
    assert index.observe("DELETED", snap("b", "web")) == ("t1", "web")
    assert index.count("t1", "web") == 0
    assert index.observe("ADDED", snap("d", "db")) == ("t1", "db")
    assert index.count("t1", "db") == 1 and index.count("t2", "web") == 1
