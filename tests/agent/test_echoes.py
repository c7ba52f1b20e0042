"""A VM's sync is not queued again by the echoes of its own work: libvirt's lifecycle events for
the calls the sync made, and the watch's copy of the status it wrote. Anything else still is."""

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from formation_vmm.agent.hypervisor import Hypervisor, start_event_loop
from formation_vmm.agent.plan import Action
from formation_vmm.agent.vms.echoes import Echoes
from formation_vmm.agent.vms.reconcile import Reconciler
from formation_vmm.agent.vms.vm_controller import VmCache
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from tests.support.factories import InlineInputs, make_vm


class Events:
    """What libvirt delivered, and what of it the agent would queue (as run.py's listener)."""

    def __init__(self, echoes: Echoes) -> None:
        self.echoes = echoes
        self.seen: list[tuple[str, str]] = []
        self.queued: list[tuple[str, str]] = []
        self.arrived = threading.Condition()

    def __call__(self, name: str, event: str) -> None:
        with self.arrived:
            self.seen.append((name, event))
            if not self.echoes.is_echo(name, event):
                self.queued.append((name, event))
            self.arrived.notify_all()

    def wait_for(self, name: str, events: list[str], timeout: float = 10.0) -> None:
        with self.arrived:
            ok = self.arrived.wait_for(lambda: all((name, e) in self.seen for e in events), timeout=timeout)
        assert ok, f"libvirt delivered {self.seen}, not {events} for {name}"


@pytest.fixture
def events() -> Iterator[tuple[Hypervisor, Events, Echoes]]:
    start_event_loop()
    echoes = Echoes()
    seen = Events(echoes)
    hv = Hypervisor("test:///default", listener=seen)
    yield hv, seen, echoes
    hv.close()


@pytest.mark.libvirt
def test_our_own_calls_queue_nothing_and_a_stop_behind_our_back_does(
    events: tuple[Hypervisor, Events, Echoes], tmp_path: Path
) -> None:
    hv, seen, echoes = events
    layout = NodeLayout(tmp_path / "run", tmp_path / "disks", tmp_path / "images", tmp_path / "cache")
    rec = Reconciler(hv, layout, "test", InlineInputs(), echoes=echoes)
    name = f"vm-{uuid.uuid4().hex[:8]}"
    vm = make_vm(name=name, uid=str(uuid.uuid4()))
    dom = domain_name("default", name)
    hv.describe(dom)  # the event connection is open before anything happens

    assert rec.reconcile(vm).actions == [Action.PREPARE_FILES, Action.DEFINE, Action.START]
    seen.wait_for(dom, ["defined", "started"])
    assert [q for q in seen.queued if q[0] == dom] == []

    hv.destroy(dom)  # not the agent's doing (a crash, an admin): the VM must be synced
    seen.wait_for(dom, ["stopped"])
    assert (dom, "stopped") in seen.queued

    assert rec.reconcile(vm, deleting=True).actions == [Action.UNDEFINE, Action.REMOVE_FILES]
    seen.wait_for(dom, ["undefined"])
    assert (dom, "undefined") not in seen.queued


@pytest.mark.pure
def test_an_expectation_is_used_once_and_lapses() -> None:
    now = [100.0]
    echoes = Echoes(ttl=5.0, clock=lambda: now[0])
    echoes.expect("d", "start")
    assert echoes.is_echo("d", "started")
    assert not echoes.is_echo("d", "started")  # a second start is news
    echoes.expect("d", "start")
    assert not echoes.is_echo("d", "stopped")  # another kind is never an echo
    assert not echoes.is_echo("e", "started")  # nor another domain's event
    now[0] += 6.0
    assert not echoes.is_echo("d", "started")  # the echo never came: the expectation lapsed


@pytest.mark.pure
def test_a_failed_call_expects_no_echo() -> None:
    echoes = Echoes()
    echoes.expect("d", "destroy")
    echoes.withdraw("d", "destroy")
    assert not echoes.is_echo("d", "stopped")
    echoes.expect("d", "shutdown")  # an ACPI request: the guest decides, its events are news
    assert not echoes.is_echo("d", "shutdown") and not echoes.is_echo("d", "stopped")


def _vm(version: str, uid: str = "u1") -> dict[str, object]:
    return {"metadata": {"namespace": "ns", "name": "a", "uid": uid, "resourceVersion": version}}


@pytest.mark.pure
def test_the_watch_copy_of_our_own_status_write_is_no_news() -> None:
    cache = VmCache()
    assert cache.update("ADDED", _vm("1")) == ("ns_a", True)
    cache.written("1", _vm("2"))  # our status write made version 2, from the copy held
    assert cache.get("ns_a") == _vm("2")  # held at once, before the watch's echo
    assert cache.update("MODIFIED", _vm("2")) == ("ns_a", False)
    assert cache.get("ns_a") == _vm("2")  # held all the same
    assert cache.update("MODIFIED", _vm("3")) == ("ns_a", True)  # someone else's write
    assert cache.update("MODIFIED", _vm("3")) == ("ns_a", False)  # the same version again
    cache.written("1", _vm("4"))  # written from a copy older than the one held
    assert cache.get("ns_a") == _vm("3")  # the watch's newer copy is not replaced by ours
    assert cache.update("MODIFIED", _vm("5")) == ("ns_a", True)  # a newer version than ours
    assert cache.update("MODIFIED", _vm("4")) == ("ns_a", True)  # a late echo of ours: news (harmless)
