"""The apiserver's work per VM is what limits a burst (docs/benchmarks.md): a VM reaches Running
in two writes, the controller's binding and the agent's status, and posts no Event on the way
(docs/decisions.md). Counted from a watch on the VM itself, so other tests' traffic on the shared
control plane cannot blur it, and with no timing in it."""

import json
import queue
import threading
from typing import Any

import pytest

from formation_vmm.api.names import ADDRESSES_ANNOTATION, NODE_LABEL, VM_PLURAL
from formation_vmm.kube import ApiError, Kube
from tests.support.fleet import TINY, Fleet, condition
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


class VmWatch:
    """Every version of one VM, in order, from a watch that starts at the version of a list made
    before the VM exists: no version can fall between the list and the watch, however slowly a
    loaded machine starts the watch (a `kubectl get --watch` started beside the create could
    list the VM already bound, and see one write fewer)."""

    def __init__(self, fleet: Fleet, namespace: str, name: str) -> None:
        self.kube = Kube.from_kubeconfig(str(fleet.kubectl.kubeconfig))
        self.namespace, self.name = namespace, name
        self.events: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.stopped = threading.Event()
        listed, self.version = self.kube.list_at(VM_PLURAL)
        assert not [vm for vm in listed if self._ours(vm)], "the VM exists before its watch"
        threading.Thread(target=self._follow, daemon=True).start()

    def _ours(self, vm: dict[str, Any]) -> bool:
        return bool(vm["metadata"]["namespace"] == self.namespace and vm["metadata"]["name"] == self.name)

    def _follow(self) -> None:
        try:
            while not self.stopped.is_set():  # each request ends after a while; the next takes up there
                for kind, vm in self.kube.watch(VM_PLURAL, self.version, timeout_seconds=30):
                    self.version = vm["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK" and self._ours(vm):
                        self.events.put((kind, vm))
        except ApiError as error:  # the test reads it in place of the next version
            self.events.put(("ERROR", {"error": str(error)}))

    def until(self, done: Any, timeout: float = 60) -> list[tuple[str, dict[str, Any]]]:
        """The versions seen, up to and including the first for which ``done`` holds."""
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            assert event[0] != "ERROR", event[1]
            seen.append(event)
            if done(event[1]):
                return seen

    def close(self) -> None:
        self.stopped.set()


def test_a_vm_reaches_running_in_two_writes_and_no_events(fleet: Fleet, ns: str) -> None:
    watch = VmWatch(fleet, ns, "frugal")
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
    assert status["nodeName"] == "node-a" and status["agentEndpoint"] and status["vcpus"] == 1
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
