"""Where the controller reaches a node's agent: the node's address as the kubelet reports it,
the port and certificate the agent publishes; an agent chooses no host."""

import json
from typing import Any

import pytest

from formation_vmm import tls
from formation_vmm.api.names import AGENT_ACCESS_ANNOTATION
from formation_vmm.controller.serving.agent_links import Unreachable, link_of

pytestmark = pytest.mark.pure

PAIR = tls.self_signed("controller")
AGENT = tls.self_signed("node-a")


def node(annotation: Any, addresses: list[dict[str, str]]) -> dict[str, Any]:
    raw = annotation if isinstance(annotation, str) else json.dumps(annotation)
    return {
        "metadata": {"name": "node-a", "annotations": {AGENT_ACCESS_ANNOTATION: raw}},
        "status": {"addresses": addresses},
    }


INTERNAL = [{"type": "Hostname", "address": "node-a"}, {"type": "InternalIP", "address": "192.0.2.7"}]


def test_the_host_is_the_nodes_address_whatever_the_agent_writes() -> None:
    published = {"port": 3004, "certificate": AGENT.cert_pem, "host": "198.51.100.1"}
    link = link_of(node(published, INTERNAL), PAIR)
    assert link.url == "https://192.0.2.7:3004"
    v6 = link_of(node(published, [{"type": "InternalIP", "address": "2001:db8::7"}]), PAIR)
    assert v6.url == "https://[2001:db8::7]:3004"


@pytest.mark.parametrize(
    "annotation",
    [
        "",
        "not json",
        {"port": 3004},
        {"port": 0, "certificate": AGENT.cert_pem},
        {"port": 70000, "certificate": AGENT.cert_pem},
        {"port": 3004, "certificate": "not a certificate"},
    ],
)
def test_an_unusable_annotation_says_so(annotation: Any) -> None:
    with pytest.raises(Unreachable, match="publishes no usable access endpoint"):
        link_of(node(annotation, INTERNAL), PAIR)


def test_a_node_without_an_address_is_unreachable() -> None:
    published = {"port": 3004, "certificate": AGENT.cert_pem}
    with pytest.raises(Unreachable, match="reports no InternalIP"):
        link_of(node(published, [{"type": "Hostname", "address": "node-a"}]), PAIR)
