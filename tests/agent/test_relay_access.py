"""Which streams a target's relay carries (agent/migration/relay_access.py), pure: the VmMigration must be
under way from that source to this node, and the target keeps its own deadline, from the
migration's creation by the apiserver, whatever status the source writes (issue 26, finding 4)."""

from datetime import UTC, datetime
from typing import Any

import pytest

from formation_vmm.agent.migration.relay import Stream
from formation_vmm.agent.migration.relay_access import past_deadline, stream_refusal
from formation_vmm.migration_rules import GIB, Limits, target_deadline

pytestmark = pytest.mark.pure

UID = "0b7e9f4c-1d2a-4e5f-8a9b-0c1d2e3f4a5b"
STREAM = Stream("tenant", "move-web", UID, "libvirt")


def migration(
    phase: str = "Migrating", source: str = "src", target: str = "tgt", uid: str = UID
) -> dict[str, Any]:
    return {
        "metadata": {"uid": uid, "creationTimestamp": "2026-12-07T10:00:00Z"},
        "spec": {"vmName": "web"},
        "status": {"phase": phase, "sourceNode": source, "targetNode": target},
    }


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (migration(), None),
        (migration("Preparing"), None),
        (None, "no such migration"),
        (migration(uid="another"), "no such migration"),
        (migration(source="x"), "not from node src to node tgt"),
        (migration(target="x"), "not from node src to node tgt"),
        (migration("Succeeded"), "is Succeeded"),
        (migration("Failed"), "is Failed"),
    ],
)
def test_only_a_migration_under_way_from_the_source_to_here(
    body: dict[str, Any] | None, words: str | None
) -> None:
    problem = stream_refusal(body, "tgt", "src", STREAM)
    assert (problem is None) if words is None else (words in (problem or ""))


def test_the_targets_own_deadline() -> None:
    limits = Limits(completion_timeout_per_gib=150, progress_timeout=150)
    allowed = target_deadline(limits, memory_bytes=2 * GIB, disk_bytes=2 * GIB)
    assert allowed == 150 * 4 + 150
    made = datetime(2026, 12, 7, 10, 0, tzinfo=UTC).timestamp()
    assert past_deadline("2026-12-07T10:00:00Z", allowed, made + allowed - 1) is None
    late = past_deadline("2026-12-07T10:00:00Z", allowed, made + allowed + 1)
    assert late is not None and "past this node's deadline" in late
