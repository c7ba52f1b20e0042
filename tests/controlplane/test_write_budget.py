"""The apiserver's work per VM is what limits a burst (docs/benchmarks.md): a VM reaches Running
in two writes, the controller's binding and the agent's status, and posts no Event on the way
(docs/decisions.md). Counted from a watch on the VM itself, so other tests' traffic on the shared
control plane cannot blur it, and with no timing in it."""

import json
import queue
from typing import Any

import pytest

from formation_vmm.api.names import ADDRESSES_ANNOTATION, NODE_LABEL, VM_PLURAL
from formation_vmm.informer import Informer
from formation_vmm.kube import Kube
from tests.support.fleet import TINY, Fleet, condition
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


class OneVm:
    """Every version of one VM, in order, from the operators' own watch (informer.py) of every
    VM, whose list is made before the VM exists: no version can fall between the list and the
    watch, however slowly a loaded machine starts it (a `kubectl get --watch` started beside the
    create could list the VM already bound, and see one write fewer). A list made again (the
    apiserver away) would show up as versions of kind None."""

    def __init__(self, fleet: Fleet, namespace: str, name: str) -> None:
        self.namespace, self.name = namespace, name
        self.events: queue.Queue[tuple[str | None, dict[str, Any]]] = queue.Queue()
        kube = Kube.from_kubeconfig(str(fleet.kubectl.kubeconfig))
        self.watch = Informer(
            kube, VM_PLURAL, self._deliver, listed=lambda _: None, timeout_seconds=30, name="one-vm"
        )
        self.watch.start()
        wait_for(lambda: self.watch.lists == 1, 30, "the watch's list")
        assert self.events.empty(), "the VM exists before its watch"

    def _deliver(self, kind: str | None, vm: dict[str, Any]) -> None:
        if vm["metadata"]["namespace"] == self.namespace and vm["metadata"]["name"] == self.name:
            self.events.put((kind, vm))

    def until(self, done: Any, timeout: float = 60) -> list[tuple[str | None, dict[str, Any]]]:
        """The versions seen, up to and including the first for which ``done`` holds."""
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if done(event[1]):
                return seen

    def close(self) -> None:
        self.watch.stop()


def test_a_vm_reaches_running_in_two_writes_and_no_events(fleet: Fleet, ns: str) -> None:
    watch = OneVm(fleet, ns, "frugal")
    try:
        fleet.apply_vm(ns, "frugal", networks=[{"name": "eth0"}], nodeSelector={"zone": "a"}, **TINY)
        versions = watch.until(lambda vm: vm.get("status", {}).get("phase") == "Running")
    finally:
        watch.close()
    kinds = [kind for kind, _ in versions]
    assert kinds == ["ADDED", "MODIFIED", "MODIFIED"], kinds  # the create, the binding, the status
    created, bound, running = (vm for _, vm in versions)
    # The binding is one write: label, finalizer and addresses together, no status yet.
    assert bound["metadata"]["labels"][NODE_LABEL] == "node-a"
    assert bound["metadata"]["finalizers"] and ADDRESSES_ANNOTATION in bound["metadata"]["annotations"]
    assert "status" not in bound or not bound["status"].get("nodeName")
    # The agent's one write says everything the binding means.
    status = running["status"]
    assert status["nodeName"] == "node-a" and status["vcpus"] == 1
    assert condition(running, "Scheduled")["status"] == "True"
    given = bound["metadata"]["annotations"][ADDRESSES_ANNOTATION]
    assert given == f"eth0=default/{status['interfaces'][0]['ipAddress']}"
    assert "status" not in created

    # Events: none on the way up. The barrier that they would have landed by now is an event
    # the same agent posts later, after the VM leaves Running (its recorder takes them in the
    # order they were posted; the controller's would have been posted before the agent's write).
    fleet.kubectl("patch", "vm", "frugal", "-n", ns, "--type=merge", "-p", '{"spec": {"paused": true}}')
    uid = running["metadata"]["uid"]

    def events() -> list[dict[str, Any]]:
        listed = json.loads(fleet.kubectl("get", "events", "-n", ns, "-o", "json"))["items"]
        return [e for e in listed if e["involvedObject"].get("uid") == uid]

    def with_paused() -> list[dict[str, Any]] | None:
        found = events()
        return found if any(e["reason"] == "Paused" for e in found) else None

    after = wait_for(with_paused, 30, "the Paused event")
    assert [e["reason"] for e in after] == ["Paused"]
