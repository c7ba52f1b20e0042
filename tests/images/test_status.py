"""A VmImage's status merged from every node's entry. Pure."""

import pytest

from formation_vmm.api.models import ImageNodeStatus, VmImageStatus, to_wire
from formation_vmm.images.status import node_entry, summarize, with_node

pytestmark = pytest.mark.pure


def entries(*pairs: tuple[str, str]) -> list[ImageNodeStatus]:
    return [ImageNodeStatus(name=n, phase=p) for n, p in pairs]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("nodes", "phase"),
    [
        ([], "Pending"),
        ([("a", "Ready")], "Ready"),
        ([("a", "Ready"), ("b", "Downloading")], "Downloading"),
        ([("a", "Converting"), ("b", "Downloading")], "Downloading"),
        ([("a", "Ready"), ("b", "Pending")], "Pending"),
        ([("a", "Downloading"), ("b", "Failed")], "Failed"),
    ],
)
def test_summarize(nodes: list[tuple[str, str]], phase: str) -> None:
    assert summarize(entries(*nodes)) == phase


def test_each_node_writes_its_entry_and_the_whole_is_recomputed() -> None:
    status = with_node(VmImageStatus(), "b", "Downloading", details=VmImageStatus(progress="10%"))
    status = with_node(status, "a", "Ready", details=VmImageStatus(progress="100%", size=5, format="raw"))
    wire = to_wire(status)
    assert wire["phase"] == "Downloading"
    assert wire["nodes"] == [{"name": "a", "phase": "Ready"}, {"name": "b", "phase": "Downloading"}]
    assert wire["progress"] == "100%" and wire["size"] == 5  # details of the node that wrote last
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason, ready.message) == ("False", "Downloading", "downloading on b")

    status = with_node(status, "b", "Failed", "HTTP 404", generation=2)
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert status.phase == "Failed" and (ready.reason, ready.message) == ("ImportFailed", "b: HTTP 404")
    assert node_entry(status, "b") == ImageNodeStatus(name="b", phase="Failed", message="HTTP 404")

    status = with_node(status, "b", "Ready")
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert status.phase == "Ready" and (ready.status, ready.message) == ("True", "cached on 2 node(s)")
    assert node_entry(status, "b") == ImageNodeStatus(name="b", phase="Ready")  # the old message is gone
