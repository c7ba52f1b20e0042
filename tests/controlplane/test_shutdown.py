"""SIGTERM ends the controller and the agent within the pods' grace period, whether or not the
apiserver answers (a frozen apiserver holds their threads in requests that never return). On a
control plane of their own: the apiserver is stopped here."""

import os
import signal
import time
from collections.abc import Iterator

import pytest
import yaml

from formation_vmm.devcluster.cluster import (
    TEST_DRIVER_ALLOCATABLE,
    Kubectl,
    OperatorProcess,
    install_crds,
    install_rbac,
    register_node,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.devcluster.processes import alive
from tests.support.cluster import private_plane
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

# The chart sets no terminationGracePeriodSeconds: Kubernetes' default applies.
GRACE_SECONDS = 30.0


@pytest.fixture
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with private_plane(tmp_path_factory, "shutdown-plane") as private:
        try:
            yield private
        finally:  # running again, it stops at SIGTERM instead of sitting out the kill timeout
            apiserver = private.processes.read().get("kube-apiserver")
            if apiserver:
                os.kill(apiserver, signal.SIGCONT)


def running(plane: ControlPlane) -> tuple[Kubectl, OperatorProcess, OperatorProcess]:
    kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
    install_crds(kubectl)
    install_rbac(kubectl)
    register_node(kubectl, "node-s", allocatable=TEST_DRIVER_ALLOCATABLE)
    agent = start_agent(plane, "node-s", "test:///default", "test", {"VMM_HEARTBEAT_SECONDS": "1"})
    controller = start_controller(plane)
    for proc in (agent, controller):
        proc.wait_ready()
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "busy", "namespace": "default"},
        "spec": {"cpus": 1, "memory": "64Mi"},
    }
    kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))
    wait_for(
        lambda: kubectl("get", "vm", "busy", "-o", "jsonpath={.status.phase}") == "Running", 60, "Running"
    )
    return kubectl, agent, controller


def exits_within_grace(proc: OperatorProcess) -> float:
    os.kill(proc.pid, signal.SIGTERM)
    started = time.monotonic()
    wait_for(lambda: not alive(proc.pid), GRACE_SECONDS, f"{proc.name} to exit after SIGTERM")
    return time.monotonic() - started


def test_both_exit_on_sigterm_while_the_apiserver_answers(plane: ControlPlane) -> None:
    _, agent, controller = running(plane)
    for proc in (agent, controller):
        exits_within_grace(proc)


def test_both_exit_on_sigterm_when_the_apiserver_does_not_answer(plane: ControlPlane) -> None:
    _, agent, controller = running(plane)
    apiserver = plane.processes.read()["kube-apiserver"]
    os.kill(apiserver, signal.SIGSTOP)  # connections open, nothing answers
    # Long enough for heartbeats, leases and resyncs to be stuck in requests.
    wait_for(lambda: "503" in _readyz(agent), 30, "the agent to notice the silent apiserver")
    for proc in (agent, controller):
        exits_within_grace(proc)


def _readyz(proc: OperatorProcess) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{proc.url}/readyz", timeout=2) as resp:
            return str(resp.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except OSError:
        return "error"
