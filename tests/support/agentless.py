"""Agentless hypervisor nodes: Node objects whose heartbeat, capacity and migration endpoint a
test writes every second, as an agent would. The controller places VMs on them and starts
migrations to them, and nothing ever runs there: a stand-in for an agent only where no real
agent can hold a VM or a migration still for as long as the test looks, or where the test
needs a node to fall silent at a moment of its choosing."""

import json
import threading
from datetime import UTC, datetime

from formation_vmm.api.names import (
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    HEARTBEAT_ANNOTATION,
    MIGRATION_ENDPOINT_ANNOTATION,
)
from formation_vmm.devcluster.cluster import register_node
from tests.support.fleet import Fleet


def beating(
    fleet: Fleet,
    nodes: tuple[str, ...],
    labels: dict[str, str],
    taint: str,
    cpus: str,
    memory: str,
    allocatable: dict[str, str] | None = None,
) -> tuple[threading.Event, threading.Thread]:
    """``nodes`` registered with ``labels`` and tainted ``dedicated=<taint>:NoSchedule`` (only
    the VMs of the test that tolerate it go there), beating until the returned event is set.
    They claim ``cpus`` and ``memory``; their "kubelet" vouches for ``allocatable`` (by
    default, the same)."""
    stop = threading.Event()
    for node in nodes:
        # What its kubelet would vouch for: what it claims (controller/binding/nodes.py bounds a claim).
        register_node(fleet.kubectl, node, labels, allocatable or {"cpu": cpus, "memory": memory})
        fleet.kubectl("taint", "node", node, f"dedicated={taint}:NoSchedule", "--overwrite")

    def beat() -> None:
        while not stop.is_set():
            at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for node in nodes:
                annotations = {
                    CAPACITY_CPUS_ANNOTATION: cpus,
                    CAPACITY_MEMORY_ANNOTATION: memory,
                    HEARTBEAT_ANNOTATION: at,
                    MIGRATION_ENDPOINT_ANNOTATION: json.dumps(
                        {"libvirt": "test:///none", "sockets": "/nonexistent"}
                    ),
                }
                fleet.kubectl(
                    "annotate", "node", node, "--overwrite", *(f"{k}={v}" for k, v in annotations.items())
                )
            stop.wait(1.0)

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    return stop, beater
