"""The agent's count of each VM's VmSnapshots: an index of the snapshots' store (informer.py's
Store, as their informer keeps it), which a snapshot being deleted leaves."""

from typing import Any

import pytest

from formation_vmm.agent.snapshots.snapshot_index import BY_VM, vm_of
from formation_vmm.informer import Store, key_of

pytestmark = pytest.mark.pure


def snap(name: str, vm: str, namespace: str = "t1", deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-03T00:00:00Z"
    return {"metadata": meta, "spec": {"vmName": vm}}


def test_counts_follow_the_store() -> None:
    store = Store({BY_VM: vm_of})

    def count(namespace: str, vm: str) -> int:
        return len(store.by(BY_VM, (namespace, vm)))

    for body in (snap("a", "web"), snap("b", "web"), snap("c", "web", namespace="t2")):
        store.put(key_of(body), body)
    assert (count("t1", "web"), count("t2", "web"), count("t1", "db")) == (2, 1, 0)
    store.put("t1/a", snap("a", "web"))  # the listing's objects again: no change
    assert count("t1", "web") == 2
    # Being deleted, it no longer counts (as for the controller's refusal); gone, nothing changes.
    store.put("t1/a", snap("a", "web", deleting=True))
    assert count("t1", "web") == 1 and store.get("t1/a") is not None
    store.put("t1/a", None)
    store.put("t1/b", None)
    assert count("t1", "web") == 0
    # A snapshot that names another VM now moves between the counts.
    store.put("t1/d", snap("d", "db"))
    store.put("t1/d", snap("d", "web"))
    assert (count("t1", "db"), count("t1", "web"), count("t2", "web")) == (0, 1, 1)
