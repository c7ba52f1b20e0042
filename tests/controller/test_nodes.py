"""A Node's annotations read into placement's view: capacity, liveness. Pure."""

from datetime import UTC, datetime

import pytest

from formation_vmm.api.names import CAPACITY_CPUS_ANNOTATION, CAPACITY_MEMORY_ANNOTATION, HEARTBEAT_ANNOTATION
from formation_vmm.controller.binding.nodes import Ceiling, node_info, node_summary

pytestmark = pytest.mark.pure

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def summary(**annotations: str) -> dict[str, object]:
    return node_summary(
        {
            "metadata": {"name": "n1", "labels": {"zone": "a"}, "annotations": annotations},
            "spec": {"taints": [{"key": "k", "effect": "NoSchedule"}]},
        }
    )


@pytest.mark.parametrize(
    ("annotations", "cpus", "memory"),
    [
        ({CAPACITY_CPUS_ANNOTATION: "8", CAPACITY_MEMORY_ANNOTATION: "16384Mi"}, 8, 16 << 30),
        ({CAPACITY_CPUS_ANNOTATION: "8"}, None, None),  # half a report is no report
        ({CAPACITY_CPUS_ANNOTATION: "eight", CAPACITY_MEMORY_ANNOTATION: "1Gi"}, None, None),
        ({CAPACITY_CPUS_ANNOTATION: "2", CAPACITY_MEMORY_ANNOTATION: "lots"}, None, None),
    ],
)
def test_capacity(annotations: dict[str, str], cpus: int | None, memory: int | None) -> None:
    info = node_info(summary(**annotations), 40, NOW)
    assert (info.cpus, info.memory) == (cpus, memory)
    assert info.labels == {"zone": "a"} and info.taints == ({"key": "k", "effect": "NoSchedule"},)


@pytest.mark.parametrize(
    ("beat", "ready"),
    [
        ("2026-05-01T11:59:30Z", True),
        ("2026-05-01T11:59:21Z", True),
        ("2026-05-01T11:59:20Z", False),  # exactly lost_after old: lost
        ("2026-05-01T11:00:00Z", False),
        ("not a time", False),
        (None, False),
    ],
)
def test_liveness_follows_the_heartbeat(beat: str | None, ready: bool) -> None:
    annotations = {HEARTBEAT_ANNOTATION: beat} if beat else {}
    assert node_info(summary(**annotations), 40, NOW).ready is ready


@pytest.mark.parametrize(
    ("allocatable", "ceiling", "cpus", "memory", "vouched"),
    [
        # The kubelet's word bounds the agent's (which claims 8 and 16Gi here).
        ({"cpu": "4", "memory": "8Gi"}, Ceiling(), 4, 8 << 30, True),
        ({"cpu": "15500m", "memory": "32Gi"}, Ceiling(), 8, 16 << 30, True),
        # No kubelet: an admin's ceiling, or nobody vouches and the node takes nothing.
        (None, Ceiling(cpus=2, memory=1 << 30), 2, 1 << 30, True),
        (None, Ceiling(), 8, 16 << 30, False),
        ({"cpu": "many", "memory": "8Gi"}, Ceiling(), 8, 16 << 30, False),
    ],
)
def test_capacity_is_bounded_by_what_the_kubelet_or_an_admin_vouches_for(
    allocatable: dict[str, str] | None, ceiling: Ceiling, cpus: int, memory: int, vouched: bool
) -> None:
    body = {
        "metadata": {
            "name": "n1",
            "annotations": {CAPACITY_CPUS_ANNOTATION: "8", CAPACITY_MEMORY_ANNOTATION: "16Gi"},
        },
        "status": {"allocatable": allocatable} if allocatable else {},
    }
    info = node_info(node_summary(body), 40, NOW, ceiling)
    assert (info.cpus, info.memory, info.vouched) == (cpus, memory, vouched)
