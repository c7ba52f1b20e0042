"""The binder's collaborators, each on its own: NodeRoom (nodes, loads, room held, placement),
QuotaBook (quotas and what counts against them), MigrationTargets (where a leaving VM may go),
NodeLoss (lost and given-up nodes) and Identities (addresses, MACs, QEMU uids). Pure tables:
the binder's own behaviour against the real apiserver is tests/controlplane's."""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from formation_vmm.api.names import (
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    DRAIN_TAINT,
    HEARTBEAT_ANNOTATION,
    MIGRATION_ENDPOINT_ANNOTATION,
    OUT_OF_SERVICE_TAINT,
)
from formation_vmm.controller.binding.identities import Identities
from formation_vmm.controller.binding.migration_targets import MigrationTargets
from formation_vmm.controller.binding.node_loss import NodeLoss
from formation_vmm.controller.binding.node_room import NodeRoom
from formation_vmm.controller.binding.nodes import Ceiling
from formation_vmm.controller.binding.quota_book import QuotaBook
from formation_vmm.ipam import AddressesExhaustedError
from formation_vmm.macs import MacInUseError
from formation_vmm.placement import Load, Request
from formation_vmm.quota import Usage
from tests.support.factories import make_vm, vm_body

pytestmark = pytest.mark.pure

GI = 2**30
LOST_AFTER = 40.0


def node(
    name: str,
    cpus: int = 4,
    memory: int = 8 * GI,
    *,
    silent: bool = False,
    taints: tuple[str, ...] = (),
    **ann: str,
) -> dict[str, Any]:
    beat = datetime.now(UTC) - timedelta(seconds=600 if silent else 0)
    return {
        "name": name,
        "labels": {},
        "annotations": {
            CAPACITY_CPUS_ANNOTATION: str(cpus),
            CAPACITY_MEMORY_ANNOTATION: f"{memory >> 20}Mi",
            HEARTBEAT_ANNOTATION: beat.strftime("%Y-%m-%dT%H:%M:%SZ"),
            **ann,
        },
        "taints": [{"key": key, "effect": "NoSchedule"} for key in taints],
        "allocatable": {},
    }


def room(*nodes: dict[str, Any]) -> NodeRoom:
    # No kubelet here: an admin's ceiling vouches for the agents' figures.
    made = NodeRoom(LOST_AFTER, ceiling=Ceiling(cpus=64, memory=256 * GI))
    for summary in nodes:
        made.node_event("ADDED", summary)
    return made


# --- NodeRoom ----------------------------------------------------------------------------------


def test_the_room_places_on_the_least_loaded_node_and_counts_what_is_bound() -> None:
    nodes = room(node("a"), node("b"))
    nodes.add("a", Load(3, GI))
    assert nodes.place(Request(1, GI)).node == "b"
    nodes.add("b", Load(4, GI))
    assert nodes.place(Request(1, GI)).node == "a"
    nodes.remove("a", Load(3, GI))
    assert nodes.load("a") == Load() and nodes.place(Request(4, GI)).node == "a"


def test_room_held_for_a_vm_on_its_way_counts_until_it_is_let_go() -> None:
    nodes = room(node("a", cpus=2))
    assert nodes.reserve("migration-1", "a", Load(2, GI)) is False  # nothing came free
    refused = nodes.place(Request(1, GI))
    assert refused.node is None and "too few free vCPUs" in refused.message
    assert nodes.reserve("migration-1", None) is True  # room came free
    assert nodes.place(Request(1, GI)).node == "a"
    assert nodes.reserve("migration-1", None) is False  # held nothing: nothing freed


def test_a_deleted_node_takes_no_vm() -> None:
    nodes = room(node("a"))
    nodes.node_event("DELETED", {"name": "a"})
    assert not nodes.known("a") and nodes.info("a") is None
    assert nodes.place(Request(1, GI)).node is None


# --- QuotaBook ---------------------------------------------------------------------------------


def quota(namespace: str, name: str, **hard: str) -> dict[str, Any]:
    return {"metadata": {"namespace": namespace, "name": name}, "spec": {"hard": hard}}


def snapshot(uid: str, namespace: str, phase: str, size: int | None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase} | ({"size": size} if size is not None else {})
    return {"metadata": {"uid": uid, "namespace": namespace}, "status": status}


def test_a_namespace_over_its_quota_is_refused_with_the_figures() -> None:
    book = QuotaBook()
    assert book.refusal("team", Usage(100, 100 * GI)) is None  # no quota: no limit
    book.quota_event("ADDED", quota("team", "vms", **{"vmm.formation.cloud/cpus": "4"}))
    book.charge("team", Usage(3, GI))
    refused = book.refusal("team", Usage(2, GI))
    assert refused is not None and "vms" in refused
    assert book.refusal("other", Usage(2, GI)) is None  # another namespace's quota is not ours
    book.refund("team", Usage(3, GI))
    assert book.refusal("team", Usage(2, GI)) is None
    book.quota_event("DELETED", quota("team", "vms"))
    assert book.quotas("team") == []


@pytest.mark.parametrize(
    ("events", "disk", "freed"),
    [
        ([("ADDED", "InProgress", None)], 0, False),  # not Ready: counts nothing yet
        ([("ADDED", "Ready", 5 * GI)], 5 * GI, False),
        ([("ADDED", "Ready", 5 * GI), ("MODIFIED", "Ready", 3 * GI)], 3 * GI, True),
        ([("ADDED", "Ready", 5 * GI), ("DELETED", "Ready", 5 * GI)], 0, True),
        ([("ADDED", "Ready", 5 * GI), ("MODIFIED", "Ready", 6 * GI)], 6 * GI, False),
    ],
)
def test_ready_snapshots_count_as_disk(
    events: list[tuple[str, str, int | None]], disk: int, freed: bool
) -> None:
    book = QuotaBook()
    said = [book.snapshot_event(kind, snapshot("s1", "team", phase, size)) for kind, phase, size in events]
    assert book.used("team") == Usage(disk=disk)
    assert said[-1] is freed


# --- MigrationTargets ----------------------------------------------------------------------------


ENDPOINT = {MIGRATION_ENDPOINT_ANNOTATION: '{"relay": "n:3003"}'}


def test_a_live_target_is_a_node_that_takes_migrations_other_than_the_source() -> None:
    targets = MigrationTargets(room(node("src", **ENDPOINT), node("plain"), node("taker", **ENDPOINT)))
    assert targets.live(Request(1, GI), "src", None).node == "taker"
    assert targets.takes_migrations("taker", "src") and not targets.takes_migrations("plain", "src")
    assert not targets.takes_migrations("src", "src")


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ("src", "the VM runs on node src already"),
        ("nowhere", "node nowhere is not a hypervisor node"),
        ("plain", "node plain takes no migrations: its agent publishes no migration endpoint"),
    ],
)
def test_a_named_target_that_cannot_be_one_says_why(wanted: str, message: str) -> None:
    targets = MigrationTargets(room(node("src", **ENDPOINT), node("plain"), node("taker", **ENDPOINT)))
    decision = targets.live(Request(1, GI), "src", wanted)
    assert decision.node is None and message in decision.message


def test_no_taker_and_no_other_node_are_said() -> None:
    alone = MigrationTargets(room(node("src", **ENDPOINT)))
    assert alone.live(Request(1, GI), "src", None).message == "no node other than src takes migrations"
    assert alone.restart(Request(1, GI), "src").message == "there is no node other than src"


def test_a_restart_goes_anywhere_but_its_node_and_drains_are_seen() -> None:
    nodes = room(node("src"), node("other"), node("draining", taints=(DRAIN_TAINT,)))
    targets = MigrationTargets(nodes)
    nodes.add("draining", Load(4, GI))  # full: the restart goes to the one with room
    assert targets.restart(Request(1, GI), "src").node == "other"
    assert targets.draining() == {"draining"}


# --- NodeLoss ----------------------------------------------------------------------------------


def test_a_silent_node_is_lost_and_given_up_only_when_marked_out_of_service() -> None:
    nodes = room(
        node("ok"), node("silent", silent=True), node("gone", silent=True, taints=[OUT_OF_SERVICE_TAINT])
    )
    loss = NodeLoss(nodes)
    assert loss.lost() == {"silent", "gone"}
    assert loss.given_up([], now=0.0) == {"gone": "marked out of service, and its agent is silent"}


def test_a_node_whose_object_is_gone_is_given_up_after_the_lost_time_if_something_needs_it() -> None:
    nodes = room(node("n"))
    loss = NodeLoss(nodes)
    nodes.node_event("DELETED", {"name": "n"})
    loss.node_event("DELETED", "n", now=100.0)
    assert loss.given_up([], now=1000.0) == {}  # nothing bound there: nothing to give up
    assert loss.given_up(["n"], now=100.0 + LOST_AFTER - 1) == {}
    assert loss.given_up(["n"], now=100.0 + LOST_AFTER) == {"n": "its Node was deleted"}
    loss.node_event("ADDED", "n", now=200.0)
    nodes.node_event("ADDED", node("n"))
    assert loss.given_up(["n"], now=1000.0) == {}
    # Never seen at all (a VM bound to a node this process never knew): counted from first asked.
    assert loss.given_up(["never"], now=5.0) == {}
    assert loss.given_up(["never"], now=5.0 + LOST_AFTER) == {"never": "its Node was deleted"}


# --- Identities --------------------------------------------------------------------------------


ETH0 = [{"name": "eth0"}]


def network(name: str, subnet: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"mode": "nat", "subnet": subnet}}


def test_identities_are_assigned_once_kept_per_vm_and_released() -> None:
    ids = Identities()
    ids.networks.network_event("ADDED", network("default", "10.251.9.0/29"))
    a, b = make_vm("a", uid="uid-a", networks=ETH0), make_vm("b", uid="uid-b", networks=ETH0)
    macs_a, addresses_a = ids.assign("uid-a", a, {})
    macs_b, addresses_b = ids.assign("uid-b", b, {})
    assert set(macs_a) == set(addresses_a) == {"eth0"}
    assert macs_a["eth0"] != macs_b["eth0"] and addresses_a["eth0"] != addresses_b["eth0"]
    assert ids.assign_uid("uid-a") != ids.assign_uid("uid-b")
    ids.release("uid-a")
    assert ids.addresses.addresses_of("uid-a") == {}


def test_a_mac_held_by_another_vm_is_refused_and_a_full_network_takes_nothing() -> None:
    ids = Identities()
    ids.networks.network_event("ADDED", network("default", "10.251.9.0/30"))  # one address to give
    mac = "02:00:00:00:00:01"
    first = make_vm("a", uid="uid-a", networks=[{"name": "eth0", "macAddress": mac}])
    ids.assign("uid-a", first, {})
    with pytest.raises(MacInUseError):
        ids.assign("uid-b", make_vm("b", uid="uid-b", networks=[{"name": "eth0", "macAddress": mac}]), {})
    with pytest.raises(AddressesExhaustedError):
        ids.assign("uid-c", make_vm("c", uid="uid-c", networks=ETH0), {})
    assert ids.addresses.addresses_of("uid-c") == {} and ids.macs.holder("default", mac) == "uid-a"
    ids.unbind("uid-a", vm_body("a", uid="uid-a"))  # the binding was never written
    assert ids.macs.holder("default", mac) is None
    assert ids.assign("uid-c", make_vm("c", uid="uid-c", networks=ETH0), {})[1]["eth0"][0] == "default"
