"""The agent's own watch of its node's VMs (informer.py), against the real apiserver with
the agent's node-bound token: a list, then the events of this node's VMs only, a VM whose
binding moves away as DELETED, a list again when the apiserver restarts, and a version too old
to watch from as GoneError. The agent's behaviour built on it is in every other test here."""

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from formation_vmm.api.names import NODE_LABEL, VM_PLURAL
from formation_vmm.devcluster.cluster import (
    TEST_DRIVER_ALLOCATABLE,
    register_node,
    service_account_kubeconfig,
)
from formation_vmm.informer import Informer
from formation_vmm.kube import GoneError, Kube
from tests.support.fleet import Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

NODE = "node-w"  # no agent runs for it: the test's VmWatch is its only reader


class Seen:
    """What the watch delivered, and the lists it made, from its thread."""

    def __init__(self) -> None:
        self.events: list[tuple[str | None, str]] = []
        self.lists: list[set[str]] = []
        self.lock = threading.Lock()

    def deliver(self, kind: str | None, body: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((kind, body["metadata"]["name"]))

    def listed(self, uids: set[str]) -> None:
        with self.lock:
            self.lists.append(uids)

    def has(self, kind: str | None, name: str) -> bool:
        with self.lock:
            return (kind, name) in self.events


@pytest.fixture
def kube(fleet: Fleet) -> Iterator[Kube]:
    register_node(fleet.kubectl, NODE, {"zone": "w"}, TEST_DRIVER_ALLOCATABLE)
    fleet.kubectl("taint", "node", NODE, "dedicated=watch:NoSchedule", "--overwrite")  # no VM is placed here
    try:
        yield Kube.from_kubeconfig(
            str(service_account_kubeconfig(fleet.kubectl, fleet.plane, "formation-vmm-agent", NODE))
        )
    finally:
        fleet.kubectl("delete", "node", NODE, check=False)


def vm_on(fleet: Fleet, namespace: str, name: str, node: str) -> str:
    """A VM bound to ``node`` by an admin (as a controller would bind it); its uid."""
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": namespace, "labels": {NODE_LABEL: node}},
        "spec": {"cpus": 1, "memory": "32Mi", "runStrategy": "Halted"},
    }
    out = fleet.kubectl("create", "-o", "json", "-f", "-", input_text=json.dumps(doc))
    return str(json.loads(out)["metadata"]["uid"])


def test_the_watch_lists_then_follows_this_nodes_vms_and_lists_again_after_a_restart(
    fleet: Fleet, ns: str, kube: Kube
) -> None:
    seen = Seen()
    early = vm_on(fleet, ns, "early", NODE)
    vm_on(fleet, ns, "elsewhere", "node-nowhere")
    selector = f"{NODE_LABEL}={NODE}"
    watch = Informer(
        kube,
        VM_PLURAL,
        seen.deliver,
        label_selector=selector,
        listed=seen.listed,
        timeout_seconds=5,
        retry_seconds=0.5,
    )
    watch.start()
    try:
        wait_for(lambda: seen.has(None, "early"), 30, "the listed VM")
        assert seen.lists == [{early}]
        late = vm_on(fleet, ns, "late", NODE)
        wait_for(lambda: seen.has("ADDED", "late"), 30, "the new VM")
        # Its binding moves away: out of the label's reach, so DELETED for this node.
        fleet.kubectl("label", "vm", "early", "-n", ns, f"{NODE_LABEL}=node-nowhere", "--overwrite")
        wait_for(lambda: seen.has("DELETED", "early"), 30, "the VM that moved away")
        # Events come in the order of the changes: the VM of another node, created before
        # "late", would have come before it.
        assert all(name != "elsewhere" for _, name in seen.events), seen.events
        # Each watch request ends after 5 s, and the next takes up where it ended: no new list,
        # nothing missed.
        wait_for(lambda: watch.requests >= 2, 30, "two watch requests to end")
        vm_on(fleet, ns, "later", NODE)
        wait_for(lambda: seen.has("ADDED", "later"), 30, "the VM created after them")
        assert watch.lists == 1

        fleet.restart_apiserver()
        wait_for(lambda: len(seen.lists) >= 2, 60, "a list after the apiserver restarted")
        assert len(seen.lists[-1]) == 2 and late in seen.lists[-1]  # the cache's part: test_robustness
        assert watch.alive()
    finally:
        watch.stop()


def test_a_version_too_old_to_watch_from_is_gone(fleet: Fleet, kube: Kube) -> None:
    _, version = kube.list_at(VM_PLURAL, f"{NODE_LABEL}={NODE}")
    assert int(version) > 1
    with pytest.raises(GoneError):
        next(iter(kube.watch(VM_PLURAL, "1", f"{NODE_LABEL}={NODE}", timeout_seconds=5)))
