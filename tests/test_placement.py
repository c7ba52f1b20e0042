import pytest

from formation_vmm.api.models import Toleration
from formation_vmm.placement import Load, NodeInfo, Request, place, tolerates

pytestmark = pytest.mark.pure

GI = 2**30


def node(name: str, cpus: int = 4, memory: int = 8 * GI, **kw: object) -> NodeInfo:
    return NodeInfo(name=name, labels=kw.pop("labels", {}), cpus=cpus, memory=memory, **kw)  # type: ignore[arg-type]


def test_no_hypervisor_node_says_so() -> None:
    decision = place(Request(1, GI), [], {})
    assert decision.node is None
    assert "no node is labeled vmm.formation.cloud/hypervisor=true" in decision.message


def test_least_loaded_node_wins() -> None:
    loads = {"a": Load(3, GI), "b": Load(1, GI)}
    assert place(Request(1, GI), [node("a"), node("b")], loads).node == "b"


def test_capacity_is_respected_and_the_message_counts_why() -> None:
    loads = {"a": Load(4, GI)}
    decision = place(Request(1, GI), [node("a"), node("b", memory=GI // 2)], loads)
    assert decision.node is None
    assert decision.message == (
        "0/2 hypervisor nodes can take the VM: 1 have too few free vCPUs, 1 have too little free memory"
    )


def test_overcommit_ratio_lets_more_in() -> None:
    loads = {"a": Load(4, GI)}
    assert place(Request(2, GI), [node("a")], loads, cpu_overcommit=2.0).node == "a"
    assert place(Request(5, GI), [node("a")], loads, cpu_overcommit=2.0).node is None


def test_node_selector_must_match() -> None:
    nodes = [node("a", labels={"zone": "x"}), node("b", labels={"zone": "y"})]
    assert place(Request(1, GI, node_selector={"zone": "y"}), nodes, {}).node == "b"
    decision = place(Request(1, GI, node_selector={"zone": "z"}), nodes, {})
    assert decision.message.endswith("2 do not match the nodeSelector")


def test_taints_need_tolerations() -> None:
    taint = {"key": "dedicated", "value": "db", "effect": "NoSchedule"}
    nodes = [node("a", taints=(taint,))]
    assert place(Request(1, GI), nodes, {}).node is None
    tol = Toleration(key="dedicated", operator="Equal", value="db", effect="NoSchedule")
    assert place(Request(1, GI, tolerations=(tol,)), nodes, {}).node == "a"


def test_exists_without_key_tolerates_everything() -> None:
    assert tolerates((Toleration(operator="Exists"),), {"key": "k", "effect": "NoExecute"})
    assert not tolerates((Toleration(key="other", operator="Exists"),), {"key": "k", "effect": "NoExecute"})


def test_a_node_without_agent_report_or_heartbeat_gets_nothing() -> None:
    unreported = NodeInfo(name="a", labels={})
    dead = node("b", ready=False)
    decision = place(Request(1, GI), [unreported, dead], {})
    assert decision.node is None
    assert "1 have no agent that reported capacity" in decision.message
    assert "1 have no live agent" in decision.message


def test_disks_count_at_their_declared_size_where_the_node_reports_its_disk() -> None:
    loads = {"a": Load(0, 0, 90 * GI)}
    nodes = [node("a", disk=100 * GI), node("b", disk=20 * GI)]
    assert place(Request(1, GI, disk=10 * GI), nodes, loads).node == "a"
    decision = place(Request(1, GI, disk=30 * GI), nodes, loads)
    assert decision.node is None and "2 have too little disk space" in decision.message
    assert place(Request(1, GI, disk=30 * GI), [node("c")], {}).node == "c"  # no report: not checked


def test_a_draining_node_gets_nothing_whatever_the_tolerations() -> None:
    """``operator: Exists`` tolerates every taint, the drain's included: a draining node is
    refused all the same, for new VMs and migration targets alike (both go through place)."""
    drain = {"key": "vmm.formation.cloud/drain", "effect": "NoSchedule"}
    everything = (Toleration(operator="Exists"),)
    exact = (Toleration(key="vmm.formation.cloud/drain", operator="Exists", effect="NoSchedule"),)
    nodes = [node("a", taints=(drain,))]
    for tolerations in ((), everything, exact):
        decision = place(Request(1, GI, tolerations=tolerations), nodes, {})
        assert decision.node is None
        assert decision.message.endswith("1 are being drained"), tolerations
    assert place(Request(1, GI, tolerations=everything), [*nodes, node("b")], {}).node == "b"
