"""Writes that race, against the real apiserver (which produces the conflicts itself): the status
writer's retry on 409 keeps the other writer's fields, and the binder that loses a race for a VM
never binds it twice. On a control plane of their own: the shared fleet's controller would race
these writes itself."""

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from formation_vmm import metrics
from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.vms.echoes import Echoes
from formation_vmm.agent.vms.reconcile import Reconciler
from formation_vmm.agent.vms.sync import VmSync
from formation_vmm.api.conditions import now, set_condition
from formation_vmm.api.models import VirtualMachineStatus, VmImageStatus
from formation_vmm.api.names import (
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    HEARTBEAT_ANNOTATION,
    IMAGE_FINALIZER,
    IMAGE_PLURAL,
    MIGRATION_PLURAL,
    NODE_LABEL,
    VM_PLURAL,
)
from formation_vmm.controller.binding.binder import Binder
from formation_vmm.controller.image_guard import HELD, ImageGuard, held
from formation_vmm.controller.sealer import Sealer, Seen
from formation_vmm.controller.vm_facts import INDEXERS, vm_facts
from formation_vmm.controller.vm_feed import VmFeed
from formation_vmm.devcluster.cluster import Kubectl, install_crds, service_account_kubeconfig
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.naming import domain_name
from formation_vmm.informer import Informer
from formation_vmm.kube import EventRecorder, Kube, Resource, StatusWriter
from tests.support.cluster import private_plane
from tests.support.factories import InlineInputs
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    with private_plane(tmp_path_factory, "writes-plane") as private:
        yield private


@pytest.fixture(scope="module")
def kube(plane: ControlPlane) -> Kube:
    return Kube.from_kubeconfig(str(plane.kubeconfig))


@pytest.fixture(scope="module")
def kubectl(plane: ControlPlane) -> Kubectl:
    k = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
    install_crds(k)
    return k


@pytest.fixture
def ns(kubectl: Kubectl) -> str:
    name = f"w-{uuid.uuid4().hex[:8]}"
    kubectl("create", "namespace", name)
    return name


def make_vm(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"cpus": 1, "memory": "64Mi"},
    }
    kubectl("apply", "-f", "-", input_text=yaml.safe_dump(doc))
    return dict(kubectl_json(kubectl, ns, name))


def kubectl_json(kubectl: Kubectl, ns: str, name: str) -> dict[str, Any]:
    return json.loads(kubectl("get", "vm", name, "-n", ns, "-o", "json"))  # type: ignore[no-any-return]


def test_a_write_from_a_stale_copy_is_computed_again_and_keeps_the_other_writers_fields(
    kube: Kube, kubectl: Kubectl, ns: str
) -> None:
    stale = make_vm(kubectl, ns, "raced")
    writer = StatusWriter(kube, VM_PLURAL, VirtualMachineStatus)
    # Another writer changes the status first: the copy we hold is now stale.
    writer.write(
        stale,
        lambda st: VirtualMachineStatus(
            conditions=set_condition(st.conditions, "Scheduled", True, "Scheduled")
        ),
    )
    seen: list[list[str]] = []

    def update(status: VirtualMachineStatus) -> VirtualMachineStatus:
        seen.append([c.type for c in status.conditions])
        return VirtualMachineStatus(conditions=set_condition(status.conditions, "Ready", True, "Running"))

    written = writer.write(stale, update)
    assert written is not None
    # First computed from the stale copy (refused with 409), then from a fresh read.
    assert seen == [[], ["Scheduled"]]
    final = kubectl_json(kubectl, ns, "raced")
    assert [c["type"] for c in final["status"]["conditions"]] == ["Scheduled", "Ready"]


def test_a_write_to_a_vm_deleted_meanwhile_is_dropped(kube: Kube, kubectl: Kubectl, ns: str) -> None:
    body = make_vm(kubectl, ns, "gone")
    kubectl("delete", "vm", "gone", "-n", ns)
    writer = StatusWriter(kube, VM_PLURAL, VirtualMachineStatus)
    assert writer.write(body, lambda st: VirtualMachineStatus(phase="Running")) is None


def test_a_binder_that_loses_the_race_for_a_vm_binds_it_nowhere_else(
    kube: Kube, kubectl: Kubectl, ns: str
) -> None:
    body = make_vm(kubectl, ns, "contested")
    # Someone else (an earlier controller) bound it while our copy was being read.
    kubectl("label", "vm", "contested", "-n", ns, f"{NODE_LABEL}=node-x")
    binder = binder_with_a_node(kube)
    conflicts = metrics.BINDINGS.labels("conflict")._value.get()
    bind(binder, kubectl, body)
    assert metrics.BINDINGS.labels("conflict")._value.get() == conflicts + 1  # it would have fitted ...
    vm = kubectl_json(kubectl, ns, "contested")
    assert vm["metadata"]["labels"][NODE_LABEL] == "node-x"  # ... but the binding of record stands
    assert "nodeName" not in vm.get("status", {})  # and the status does not claim otherwise
    # The slot it nearly took is free again: the next VM gets the whole node.
    assert bind(binder, kubectl, make_vm(kubectl, ns, "next")) == NODE
    assert kubectl_json(kubectl, ns, "next")["metadata"]["labels"][NODE_LABEL] == NODE
    release(kubectl, ns, "next")


def test_a_binder_binding_a_vm_deleted_meanwhile_frees_the_slot(
    kube: Kube, kubectl: Kubectl, ns: str
) -> None:
    binder = binder_with_a_node(kube, cpus=1)
    stale = make_vm(kubectl, ns, "brief")
    kubectl("delete", "vm", "brief", "-n", ns)
    bind(binder, kubectl, stale)
    # Had the slot stayed counted, a 1-CPU node would have no room left.
    assert bind(binder, kubectl, make_vm(kubectl, ns, "after")) == NODE
    release(kubectl, ns, "after")


def test_the_binder_gives_back_the_slots_of_vms_deleted_or_moved_by_hand(
    kube: Kube, kubectl: Kubectl, ns: str
) -> None:
    """The binder keeps each node's load as a running sum: whatever takes a binding away must
    take its share off the sum, or the node fills up with VMs that are gone."""
    binder = binder_with_a_node(kube, cpus=2)
    first, second = make_vm(kubectl, ns, "first"), make_vm(kubectl, ns, "second")
    assert bind(binder, kubectl, first) == NODE and bind(binder, kubectl, second) == NODE
    third = make_vm(kubectl, ns, "third")
    assert bind(binder, kubectl, third) is None  # full: 2 of 2 CPUs

    binder.vm_event("DELETED", kubectl_json(kubectl, ns, "first"))
    assert bind(binder, kubectl, kubectl_json(kubectl, ns, "third")) == NODE  # its CPU came back

    moved = kubectl_json(kubectl, ns, "second")
    moved["metadata"]["labels"][NODE_LABEL] = "elsewhere"  # a label changed by hand
    binder.vm_event("MODIFIED", moved)
    assert bind(binder, kubectl, make_vm(kubectl, ns, "fourth")) == NODE
    assert bind(binder, kubectl, make_vm(kubectl, ns, "fifth")) is None  # and no more than that
    for name in ("first", "second", "third", "fourth"):
        release(kubectl, ns, name)


def release(kubectl: Kubectl, ns: str, name: str) -> None:
    """No agent runs for NODE: take its finalizer off, as its agent would, so the VM can go."""
    kubectl("patch", "vm", name, "-n", ns, "--type=merge", "-p", '{"metadata": {"finalizers": null}}')


NODE = "node-writes"


def bind(binder: Binder, kubectl: Kubectl, body: dict[str, Any]) -> str | None:
    """Hand the binder an unbound VM as its watch would, and run a binding pass: the node the VM
    is bound to now (its label), or None when it was not placed."""
    binder.vm_event(None, body)
    binder.bind_pending()
    meta = body["metadata"]
    found = json.loads(
        kubectl("get", "vm", meta["name"], "-n", meta["namespace"], "-o", "json", check=False) or "{}"
    )
    return (found.get("metadata", {}).get("labels") or {}).get(NODE_LABEL)


def unstarted_stores(kube: Kube) -> Seen:
    """The informers the sealer and the image guard read, not started: empty stores (these
    tests feed the binder; what the others read of the stores is theirs to test)."""
    return Seen(
        vms=Informer(kube, VM_PLURAL, transform=vm_facts, indexers=INDEXERS),
        nodes=Informer(kube, Resource("nodes", "", "v1")),
        images=Informer(kube, IMAGE_PLURAL, indexers={HELD: held}),
        migrations=Informer(kube, MIGRATION_PLURAL),
    )


def feed_watch(kube: Kube, feed: VmFeed, selector: str) -> Informer:
    """The controller's VM informer as run.py builds it, fed to ``feed``, over the VMs
    ``selector`` picks (a test's own), its requests short so a stop ends within a second."""
    return Informer(
        kube,
        VM_PLURAL,
        feed.event,
        label_selector=selector,
        transform=vm_facts,
        indexers=INDEXERS,
        changed=feed.changed,
        timeout_seconds=1,
        retry_seconds=0.2,
    )


def binder_with_a_node(kube: Kube, cpus: int = 4, node: str = NODE) -> Binder:
    binder = Binder(StatusWriter(kube, VM_PLURAL, VirtualMachineStatus), EventRecorder(kube, "test"))
    binder.seed([])  # the VMs these tests hand it are all it knows
    annotations = {
        CAPACITY_CPUS_ANNOTATION: str(cpus),
        CAPACITY_MEMORY_ANNOTATION: "4096Mi",
        HEARTBEAT_ANNOTATION: now().strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    # The kubelet's allocatable vouches for the capacity the agent claims (controller/binding/nodes.py).
    allocatable = {"cpus": cpus, "memory": 4096 << 20}
    binder.node_event(
        "ADDED",
        {"name": node, "labels": {}, "annotations": annotations, "taints": [], "allocatable": allocatable},
    )
    return binder


def test_the_controllers_feed_frees_the_room_of_a_vm_a_new_list_lacks(
    kube: Kube, kubectl: Kubectl, ns: str
) -> None:
    """The controller's own VM watch (informer.py into controller/vm_feed.py): a VM deleted while
    no watch delivered it (here: between one watch's stop and the next one's list, as when the
    apiserver was away) leaves the binder's sums when the next list lacks it. A node of its own,
    and a watch of this test's VMs only (by a label): the VMs other tests here leave, bound or
    not, would come down the watch too, and a binding pass binds every VM it has pending."""
    binder = binder_with_a_node(kube, cpus=1, node="node-feed")
    images = StatusWriter(kube, IMAGE_PLURAL, VmImageStatus)
    events = EventRecorder(kube, "test")
    seen = unstarted_stores(kube)
    feed = VmFeed(
        binder,
        Sealer(kube, StatusWriter(kube, VM_PLURAL, VirtualMachineStatus), images, events, seen),
        ImageGuard(images, events, lambda namespace: kube.list(VM_PLURAL, namespace), seen.images),
        leading=lambda: False,  # a standby: it feeds its memory and writes nothing
    )
    mine = f"feed-test={ns}"

    def labeled_vm(name: str) -> dict[str, Any]:
        make_vm(kubectl, ns, name)
        kubectl("label", "vm", name, "-n", ns, mine)
        return kubectl_json(kubectl, ns, name)

    assert bind(binder, kubectl, labeled_vm("gone")) == "node-feed"
    watch = feed_watch(kube, feed, mine)
    watch.start()
    wait_for(lambda: watch.lists == 1, 30, "the first watch's list")
    watch.stop()
    wait_for(lambda: not watch.alive(), 30, "the first watch's end")  # its last request ends within 1 s
    assert bind(binder, kubectl, labeled_vm("waiting")) is None  # 1 of 1 CPU held by "gone"
    release(kubectl, ns, "gone")
    kubectl("delete", "vm", "gone", "-n", ns, "--wait=true")
    watch.start()  # as after the apiserver came back: it lists again
    try:
        wait_for(lambda: watch.lists == 2, 30, "the second watch's list")
        # Had the list's lack not freed its CPU, a 1-CPU node would still be full.
        assert bind(binder, kubectl, kubectl_json(kubectl, ns, "waiting")) == "node-feed"
    finally:
        watch.stop()
    release(kubectl, ns, "waiting")


def test_an_image_held_for_a_vm_deleted_while_the_watch_was_down_is_released_by_the_next_list(
    kube: Kube, kubectl: Kubectl, ns: str
) -> None:
    """The image guard keeps no memory of which VM names which image: it compares what the VM
    store kept before and after (vm_facts.py). A VM deleted while no watch delivered it comes
    from the next list as a deletion, with the facts the store kept, and the deleted VmImage it
    held is released (the guard confirms with a fresh list that nothing uses it)."""
    images = StatusWriter(kube, IMAGE_PLURAL, VmImageStatus)
    events = EventRecorder(kube, "test")
    seen = unstarted_stores(kube)
    guard = ImageGuard(images, events, lambda namespace: kube.list(VM_PLURAL, namespace), seen.images)
    binder = binder_with_a_node(kube, cpus=1, node="node-guard")
    sealer = Sealer(kube, StatusWriter(kube, VM_PLURAL, VirtualMachineStatus), images, events, seen)
    feed = VmFeed(binder, sealer, guard, leading=lambda: True)
    image_doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VmImage",
        "metadata": {"name": "base", "namespace": ns, "finalizers": [IMAGE_FINALIZER]},
        "spec": {"source": {"http": {"url": "http://127.0.0.1:9/base.qcow2"}}},
    }
    kubectl("create", "-f", "-", input_text=json.dumps(image_doc))
    vm_doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "user", "namespace": ns, "labels": {"guard-test": ns}},
        "spec": {
            "cpus": 1,
            "memory": "32Mi",
            "runStrategy": "Halted",
            "disks": [{"name": "root", "image": "base"}],
        },
    }
    kubectl("create", "-f", "-", input_text=json.dumps(vm_doc))
    seen.images.start()
    watch = feed_watch(kube, feed, f"guard-test={ns}")
    watch.start()
    try:
        wait_for(lambda: watch.lists == 1, 30, "the first watch's list")
        kubectl("delete", "vmimage", "base", "-n", ns, "--wait=false")
        wait_for(lambda: seen.images.by(HELD, True), 30, "the image held, in the images' store")
        watch.stop()
        wait_for(lambda: not watch.alive(), 30, "the first watch's end")
        assert kubectl("get", "vmimage", "base", "-n", ns, "-o", "name", check=False)  # still held
        kubectl("delete", "vm", "user", "-n", ns, "--wait=true")  # no watch sees it go
        watch.start()  # as after the apiserver came back: it lists again
        wait_for(
            lambda: not kubectl("get", "vmimage", "base", "-n", ns, "-o", "name", check=False),
            30,
            "the image released by the list that lacks its last user",
        )
    finally:
        watch.stop()
        seen.images.stop()


def test_a_write_the_controllers_feed_cannot_make_is_logged_and_the_event_still_counts(
    kube: Kube, kubectl: Kubectl, plane: ControlPlane, ns: str
) -> None:
    """The leader's writes happen in the watch's thread: one that fails (here a real 403, from
    a service account with no rights) must not escape into the watch, which would end its
    request and list every VM again, and must not keep the event from the binder."""
    binder = binder_with_a_node(kube, cpus=1, node="node-repair")
    kubectl("create", "serviceaccount", "nobody", "-n", ns)  # no role bound to it anywhere
    powerless = Kube.from_kubeconfig(str(service_account_kubeconfig(kubectl, plane, "nobody", namespace=ns)))
    images = StatusWriter(powerless, IMAGE_PLURAL, VmImageStatus)
    events = EventRecorder(powerless, "test")
    writer = StatusWriter(powerless, VM_PLURAL, VirtualMachineStatus)
    admin_writer, binder.status = binder.status, writer  # the repair's writer: the one without rights
    seen = unstarted_stores(powerless)
    sealer = Sealer(powerless, writer, images, events, seen)
    feed = VmFeed(binder, sealer, ImageGuard(images, events, lambda _: [], seen.images), leading=lambda: True)
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "relabeled", "namespace": ns, "labels": {NODE_LABEL: "node-repair"}},
        "spec": {"cpus": 1, "memory": "32Mi", "runStrategy": "Halted"},
    }
    kubectl("create", "-f", "-", input_text=json.dumps(doc))
    kubectl(
        "patch", "vm", "relabeled", "-n", ns, "--subresource=status", "--type=merge",
        "-p", '{"status": {"nodeName": "node-elsewhere"}}',
    )  # fmt: skip
    body = kubectl_json(kubectl, ns, "relabeled")
    assert Binder.status_needs_repair(body)  # so the feed tries the write, and is refused
    feed.event("MODIFIED", body)  # raised before the fix
    assert kubectl_json(kubectl, ns, "relabeled")["status"]["nodeName"] == "node-elsewhere"
    # The binder took the event all the same: the 1-CPU node is full.
    binder.status = admin_writer
    assert bind(binder, kubectl, make_vm(kubectl, ns, "next")) is None


def test_a_binding_write_that_fails_is_made_again_at_the_next_pass(
    kube: Kube, kubectl: Kubectl, plane: ControlPlane, ns: str
) -> None:
    """A binding write the API refuses (here a real 403, from a service account with no rights;
    in CI, an admission policy not configured yet just after the apiserver restarted) gives
    back the node's room and leaves the VM to be decided again: it used to stay unbound until
    it changed, its room held."""
    binder = binder_with_a_node(kube, cpus=1, node="node-retry")
    kubectl("create", "serviceaccount", "nobody", "-n", ns)  # no role bound to it anywhere
    powerless = Kube.from_kubeconfig(str(service_account_kubeconfig(kubectl, plane, "nobody", namespace=ns)))
    admin_writer, binder.status = binder.status, StatusWriter(powerless, VM_PLURAL, VirtualMachineStatus)
    assert bind(binder, kubectl, make_vm(kubectl, ns, "first")) is None  # the write refused
    binder.status = admin_writer
    binder.bind_pending()  # the next pass: no event of the VM in between
    assert kubectl_json(kubectl, ns, "first")["metadata"]["labels"][NODE_LABEL] == "node-retry"
    release(kubectl, ns, "first")


def test_a_sync_reads_the_api_before_acting_on_a_copy_older_than_a_moved_binding(
    kube: Kube, kubectl: Kubectl, ns: str, tmp_path: Path
) -> None:
    """VmSync plans from the cache's copy and reads the VM from the API before acting on it:
    a copy from before the binding moved (a migration that just ended; its domain gone from
    here) defines and starts nothing. Its status write reaches the cache once, with the
    version of the copy the sync started from. Real parts: the apiserver, libvirt's test
    driver."""
    hypervisor = Hypervisor("test:///default")
    layout = NodeLayout(tmp_path / "run", tmp_path / "disks", tmp_path / "images", tmp_path / "cache")
    writes: list[tuple[str | None, dict[str, Any]]] = []
    sync = VmSync(
        Reconciler(hypervisor, layout, "test", InlineInputs(), echoes=Echoes()),
        StatusWriter(kube, VM_PLURAL, VirtualMachineStatus),
        EventRecorder(kube, "test"),
        "node-sync",
        on_written=lambda since, written: writes.append((since, written)),
    )
    doc = {
        "apiVersion": "vmm.formation.cloud/v1alpha1",
        "kind": "VirtualMachine",
        "metadata": {"name": "moved", "namespace": ns, "labels": {NODE_LABEL: "node-sync"}},
        "spec": {"cpus": 1, "memory": "32Mi"},
    }
    kubectl("create", "-f", "-", input_text=json.dumps(doc))
    body = kubectl_json(kubectl, ns, "moved")
    domain = domain_name(ns, "moved")
    try:
        assert sync.sync(body).outcome == "acted"
        info = hypervisor.describe(domain)
        assert info is not None and info.actual.active
        assert [since for since, _ in writes] == [body["metadata"]["resourceVersion"]]  # once
        stale = writes[-1][1]  # the cache's copy: the one our write made
        kubectl("label", "vm", "moved", "-n", ns, "--overwrite", f"{NODE_LABEL}=node-elsewhere")
        hypervisor.destroy(domain)  # the guest runs on the target now: nothing of it here
        hypervisor.undefine(domain)
        result = sync.sync(stale)
        assert result.gone
        assert hypervisor.describe(domain) is None  # not defined again from the stale copy
    finally:
        if hypervisor.describe(domain) is not None:
            hypervisor.destroy(domain)
            hypervisor.undefine(domain)
        hypervisor.close()
