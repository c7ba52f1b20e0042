"""Which nodes' agents a snapshot or restore waits for, read from its finalizers and label
(controller/moves/lost_nodes.py): what lets the controller release one whose node is lost."""

import pytest

from formation_vmm.api.names import IMAGE_FINALIZER, NODE_LABEL, agent_finalizer
from formation_vmm.controller.moves.lost_nodes import finalizing_nodes

pytestmark = pytest.mark.pure

LONG = "a-node-whose-name-is-far-too-long-for-a-finalizer-" + "x" * 40 + ".example.com"


def item(finalizers: list[str], label: str | None = None) -> dict:  # type: ignore[type-arg]
    labels = {NODE_LABEL: label} if label else {}
    return {"metadata": {"name": "s", "namespace": "n", "finalizers": finalizers, "labels": labels}}


def test_a_finalizer_names_its_node_and_others_are_not_agents() -> None:
    assert finalizing_nodes(item([agent_finalizer("node-a"), IMAGE_FINALIZER, "example.com/keep"])) == {
        "node-a"
    }


def test_a_node_claimed_it_and_another_holds_it_still() -> None:
    # Claimed by node-b (its label) after node-a had: both agents' finalizers are there.
    both = [agent_finalizer("node-a"), agent_finalizer("node-b")]
    assert finalizing_nodes(item(both, label="node-b")) == {"node-a", "node-b"}


def test_a_long_node_name_is_a_digest_in_the_finalizer_and_the_label_names_it() -> None:
    finalizer = agent_finalizer(LONG)
    assert LONG not in finalizer
    assert finalizing_nodes(item([finalizer], label=LONG)) == {LONG}
    assert finalizing_nodes(item([finalizer])) == set()  # no label: nothing names it
    assert finalizing_nodes(item([], label=LONG)) == set()  # a label without the finalizer holds nothing
