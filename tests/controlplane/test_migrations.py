"""The controller's side of live migration on the fleet, against the real apiserver: VmMigrations
that cannot go anywhere fail at once with their reason, and 20 requested together respect the
limits (5 in the cluster, 2 out of each node: KubeVirt's defaults; 3 of one namespace).

The copies themselves need two real libvirtds (tests/migration/test_vm_migration.py). Here the
target nodes are Node objects with no agent (tests/support/agentless.py): the test writes their
heartbeat, capacity and migration endpoint, as an agent would, so migrations stop at Preparing
(no agent prepares) and stay there: exactly what the limits count. Such a node stands in for
an agent only where no agent can hold a migration still for as long as the test looks."""

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from formation_vmm.api.names import NODE_LABEL
from tests.support.agentless import beating
from tests.support.fleet import ON_QEMU, QEMU_TOLERATION, TINY, Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

TARGETS = ("mig-t1", "mig-t2")
TAINT = {"key": "dedicated", "operator": "Equal", "value": "migration", "effect": "NoSchedule"}
MIGRATION_NODE = {"zone": "m", "migrations": "here"}


def migrations(fleet: Fleet, ns: str) -> dict[str, dict[str, Any]]:
    items = json.loads(fleet.kubectl("get", "vmmig", "-n", ns, "-o", "json"))["items"]
    return {m["metadata"]["name"]: m.get("status") or {} for m in items}


def summary(seen: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str, str]]:
    return {name: (s.get("phase", ""), s.get("reason", ""), s.get("message", "")) for name, s in seen.items()}


def request(ns: str, name: str, vm: str, target: str | None = None) -> dict[str, Any]:
    spec = {"vmName": vm, **({"targetNode": target} if target else {})}
    return {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VmMigration",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


@pytest.fixture
def targets(fleet: Fleet) -> Iterator[threading.Event]:
    """Two roomy target nodes."""
    stop, beater = beating(fleet, TARGETS, MIGRATION_NODE, "migration", "64", "65536Mi")
    try:
        yield stop
    finally:
        stop.set()
        beater.join(10)
        for node in TARGETS:
            fleet.kubectl("delete", "node", node, check=False)


def movable(**spec: Any) -> dict[str, Any]:
    """A tiny VM that tolerates the target nodes' taint."""
    tolerations = [*spec.pop("tolerations", []), TAINT]
    return {**TINY, **spec, "tolerations": tolerations}


def test_a_migration_that_cannot_happen_fails_at_once_with_its_reason(
    fleet: Fleet, ns: str, targets: threading.Event
) -> None:
    fleet.apply_vm(ns, "halted", runStrategy="Halted", **movable(nodeSelector={"zone": "a"}))
    fleet.apply_vm(ns, "paused", paused=True, **movable(nodeSelector={"zone": "a"}))
    fleet.apply_vm(ns, "runs", **movable(nodeSelector={"zone": "b"}))
    fleet.wait_phase(ns, "halted", "Stopped")
    fleet.wait_phase(ns, "paused", "Paused")
    fleet.wait_phase(ns, "runs", "Running")
    for doc in (
        request(ns, "to-nowhere", "runs", "no-such-node"),
        request(ns, "to-itself", "runs", "node-b"),
        request(ns, "not-agent", "runs", "node-a"),  # a hypervisor whose agent takes no migrations
        request(ns, "of-halted", "halted"),
        request(ns, "of-paused", "paused"),
        request(ns, "of-ghost", "ghost"),
    ):
        fleet.apply(doc)
    expected = {
        "to-nowhere": ("BadTarget", "node no-such-node is not a hypervisor node"),
        "to-itself": ("BadTarget", "runs on node node-b already"),
        "not-agent": ("BadTarget", "node node-a takes no migrations"),
        "of-halted": ("NotRunning", "VM halted is Stopped"),
        "of-paused": ("Paused", "VM paused is paused"),
        "of-ghost": ("VmNotFound", "VM ghost does not exist"),
    }

    def all_failed() -> bool:
        seen = migrations(fleet, ns)
        return all(seen.get(name, {}).get("phase") == "Failed" for name in expected)

    wait_for(all_failed, 30, "every impossible migration to fail")
    seen = migrations(fleet, ns)
    for name, (reason, words) in expected.items():
        assert seen[name]["reason"] == reason, (name, seen[name])
        assert words in seen[name]["message"], (name, seen[name])
    # The VM it was about shows it too; the others did not move.
    assert fleet.vm(ns, "halted")["status"]["migration"]["phase"] == "Failed"
    assert fleet.vm(ns, "runs")["status"]["nodeName"] == "node-b"


@pytest.fixture
def ns2(fleet: Fleet) -> Iterator[str]:
    """A second tenant's namespace, cleaned up as ``ns`` is."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    fleet.kubectl("create", "namespace", name)
    yield name
    fleet.kubectl("delete", "vm", "--all", "-n", name, "--wait=true", "--timeout=60s", check=False)
    fleet.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_twenty_requests_at_once_respect_the_limits(
    fleet: Fleet, ns: str, ns2: str, targets: threading.Event
) -> None:
    """3 VMs on node-a and 2 on node-q in one namespace, 3 on node-b in another; 20 requests in
    one apply: one for each VM, a second for each (refused: one migration per VM), and 4 for VMs
    that do not exist. Of the 8 that may go, 5 take a slot (at most 2 out of each node, at most 3
    of one namespace) and 3 wait, saying why; a slot freed goes to one that waited; a target that
    goes silent fails its migrations."""
    home = {f"a{i}": (ns, "a") for i in range(3)} | {f"b{i}": (ns2, "b") for i in range(3)}
    for name, (where, zone) in home.items():
        fleet.apply_vm(where, name, **movable(nodeSelector={"zone": zone}))
    for name in ("q0", "q1"):
        fleet.apply_vm(ns, name, **movable(**{**ON_QEMU, "tolerations": [QEMU_TOLERATION]}))
        home[name] = (ns, "q")
    for name, (where, _) in home.items():
        fleet.wait_phase(where, name, "Running", timeout=90)
        # From now on the VM may run on the target nodes only: where a migration takes it.
        anywhere_but_here = {"spec": {"nodeSelector": {"zone": None, "migrations": "here"}}}
        fleet.kubectl("patch", "vm", name, "-n", where, "--type=merge", "-p", json.dumps(anywhere_but_here))
    docs = [request(where, f"{vm}-1", vm) for vm, (where, _) in home.items()]
    docs += [request(where, f"{vm}-2", vm) for vm, (where, _) in home.items()]
    docs += [request(ns, f"ghost{i}-1", f"ghost{i}") for i in range(4)]
    assert len(docs) == 20
    fleet.kubectl(
        "apply", "-f", "-", input_text=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )

    def both() -> dict[str, dict[str, Any]]:
        return {
            name: {**status, "namespace": where}
            for where in (ns, ns2)
            for name, status in migrations(fleet, where).items()
        }

    def settled() -> bool:
        seen = both()
        return len(seen) == 20 and all(
            s.get("phase") in ("Preparing", "Pending", "Failed") for s in seen.values()
        )

    try:
        wait_for(settled, 60, "every request to be decided")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; they are {summary(both())}") from None
    seen = both()
    phases = Counter(s["phase"] for s in seen.values())
    assert phases == {"Failed": 12, "Preparing": 5, "Pending": 3}, seen
    reasons = Counter(s["reason"] for s in seen.values() if s["phase"] == "Failed")
    assert reasons == {"AlreadyMigrating": 8, "VmNotFound": 4}
    assert all(seen[f"{vm}-2"]["phase"] == "Failed" for vm in home)  # the later of each pair
    preparing = {name: s for name, s in seen.items() if s["phase"] == "Preparing"}
    assert max(Counter(s["sourceNode"] for s in preparing.values()).values()) <= 2
    assert Counter(s["namespace"] for s in preparing.values()) == {ns: 3, ns2: 2}
    assert {s["targetNode"] for s in preparing.values()} <= set(TARGETS)
    waiting = [s for s in seen.values() if s["phase"] == "Pending"]
    assert all(s["reason"] == "LimitReached" and "waits its turn" in s["message"] for s in waiting)

    # Cancel one that holds a slot: one that waited takes it, within the limits.
    gone = sorted(preparing)[0]
    fleet.kubectl("delete", "vmmig", gone, "-n", preparing[gone]["namespace"])

    def refilled() -> bool:
        now = both()
        return gone not in now and Counter(s["phase"] for s in now.values())["Preparing"] == 5

    wait_for(refilled, 30, "a waiting migration to take the freed slot")
    now = both()
    assert max(Counter(s["sourceNode"] for s in now.values() if s["phase"] == "Preparing").values()) <= 2

    # The targets go silent (their "agent" stops): every migration preparing there fails.
    targets.set()
    wait_for(lambda: not any(s["phase"] == "Preparing" for s in both().values()), 60,
             "the migrations to a silent target to fail")  # fmt: skip
    lost = [s for s in both().values() if s.get("reason") == "TargetLost"]
    assert len(lost) >= 5, both()
    # None of the VMs moved.
    for name, (where, zone) in home.items():
        assert fleet.vm(where, name)["metadata"]["labels"]["vmm.formation.cloud/node"] == f"node-{zone}"


def test_the_targets_room_is_held_for_the_vm_on_its_way(fleet: Fleet, ns: str) -> None:
    """A target with room for one tiny VM: while a migration prepares there, a new VM that
    fits only there stays Pending; once the migration is cancelled, the room is free again and
    the new VM takes it."""
    small = "mig-small"
    stop, beater = beating(fleet, (small,), MIGRATION_NODE, "migration", "1", "64Mi")
    try:
        fleet.apply_vm(ns, "mover", **movable(nodeSelector={"zone": "a"}))
        fleet.wait_phase(ns, "mover", "Running")
        wanted = {"spec": {"nodeSelector": {"zone": None, "migrations": "here"}}}
        fleet.kubectl("patch", "vm", "mover", "-n", ns, "--type=merge", "-p", json.dumps(wanted))
        fleet.apply(request(ns, "to-small", "mover", small))
        wait_for(lambda: migrations(fleet, ns).get("to-small", {}).get("phase") == "Preparing", 30,
                 "the migration to prepare on the small node")  # fmt: skip

        fleet.apply_vm(ns, "newcomer", **movable(nodeSelector={"zone": "m"}))
        pending = fleet.wait_vm(
            ns,
            "newcomer",
            lambda vm: any(
                c["type"] == "Scheduled" and c["status"] == "False"
                for c in vm.get("status", {}).get("conditions", [])
            ),
            "to be refused a node",
        )
        assert NODE_LABEL not in pending["metadata"].get("labels", {}), pending["metadata"]
        assert pending["status"]["phase"] == "Pending"

        fleet.kubectl("delete", "vmmig", "to-small", "-n", ns)
        bound = fleet.wait_vm(
            ns,
            "newcomer",
            lambda vm: vm["metadata"].get("labels", {}).get(NODE_LABEL) == small,
            f"bound to {small}",
        )
        assert bound["metadata"]["labels"][NODE_LABEL] == small
        assert fleet.vm(ns, "mover")["status"]["nodeName"] == "node-a"  # it never left
    finally:
        stop.set()
        beater.join(10)
        fleet.kubectl("delete", "vm", "newcomer", "-n", ns, "--wait=false", check=False)
        fleet.kubectl("delete", "node", small, check=False)
