"""The apiserver's work per VM is what limits a burst (docs/benchmarks.md): a VM reaches Running
in two writes, the controller's binding and the agent's status, and posts no Event on the way
(docs/decisions.md). Counted from a watch on the VM itself, so other tests' traffic on the shared
control plane cannot blur it, and with no timing in it."""

import json
import queue
import subprocess
import threading
from typing import Any

import pytest

from formation_vmm.api.names import ADDRESSES_ANNOTATION, NODE_LABEL
from tests.support.fleet import TINY, Fleet, condition
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


class VmWatch:
    """Every version of one VM, in order, from a `kubectl get --watch` started before it exists."""

    def __init__(self, fleet: Fleet, namespace: str, name: str) -> None:
        argv = [
            str(fleet.kubectl.binary), "--kubeconfig", str(fleet.kubectl.kubeconfig),
            "get", "vm", "-n", namespace, "--watch", "--output-watch-events", "-o", "json",
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        self.name = name
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        decoder = json.JSONDecoder()
        buffer = ""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            buffer += line
            try:
                event, end = decoder.raw_decode(buffer.lstrip())
            except json.JSONDecodeError:
                continue
            buffer = buffer.lstrip()[end:]
            if event["object"]["metadata"]["name"] == self.name:
                self.events.put(event)

    def until(self, done: Any, timeout: float = 60) -> list[dict[str, Any]]:
        """The versions seen, up to and including the first for which ``done`` holds."""
        seen = []
        while True:
            event = self.events.get(timeout=timeout)
            seen.append(event)
            if done(event["object"]):
                return seen

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_vm_reaches_running_in_two_writes_and_no_events(fleet: Fleet, ns: str) -> None:
    watch = VmWatch(fleet, ns, "frugal")
    try:
        fleet.apply_vm(ns, "frugal", networks=[{"name": "eth0"}], nodeSelector={"zone": "a"}, **TINY)
        versions = watch.until(lambda vm: vm.get("status", {}).get("phase") == "Running")
    finally:
        watch.close()
    kinds = [event["type"] for event in versions]
    assert kinds == ["ADDED", "MODIFIED", "MODIFIED"], kinds  # the create, the binding, the status
    created, bound, running = (event["object"] for event in versions)
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
