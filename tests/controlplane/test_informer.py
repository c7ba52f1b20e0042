"""Every kind either process watches comes down an Informer (informer.py), and none misses a
deletion: an object deleted while the watch was down is DELETED on the next list, with the body
last seen. One test per kind against the real apiserver: start the informer, stop it, delete,
start it again. (The VMs' informer reports its lists' uids instead; tests/controlplane/
test_vm_watch.py and test_writes.py test that.)"""

import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from formation_vmm.api.names import (
    API_VERSION,
    IMAGE_PLURAL,
    MIGRATION_PLURAL,
    NETWORK_PLURAL,
    RESTORE_PLURAL,
    SNAPSHOT_PLURAL,
)
from formation_vmm.devcluster.cluster import Kubectl
from formation_vmm.devcluster.controlplane import ControlPlane
from formation_vmm.informer import Informer
from formation_vmm.kube import Kube, Resource
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

Body = dict[str, Any]


def ours(kind: str, spec: Body) -> Callable[[str, str], Body]:
    return lambda ns, name: {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, **({"namespace": ns} if ns else {})},
        "spec": spec,
    }


def core(kind: str, body: Body, version: str = "v1") -> Callable[[str, str], Body]:
    return lambda ns, name: {
        "apiVersion": version,
        "kind": kind,
        "metadata": {"name": name, **({"namespace": ns} if ns else {})},
        **body,
    }


# (the resource as the processes watch it, cluster-scoped?, a body of that kind)
KINDS: dict[str, tuple[Resource, bool, Callable[[str, str], Body]]] = {
    "vmimages": (
        Resource(IMAGE_PLURAL),
        False,
        ours("VmImage", {"source": {"http": {"url": "http://127.0.0.1:9/x.qcow2"}}, "format": "qcow2"}),
    ),
    "vmnetworks": (
        Resource(NETWORK_PLURAL),
        True,
        ours("VmNetwork", {"mode": "isolated", "subnet": "10.251.7.0/24"}),
    ),
    "vmsnapshots": (Resource(SNAPSHOT_PLURAL), False, ours("VmSnapshot", {"vmName": "absent"})),
    "vmrestores": (
        Resource(RESTORE_PLURAL),
        False,
        ours("VmRestore", {"vmName": "absent", "snapshotName": "absent"}),
    ),
    "vmmigrations": (Resource(MIGRATION_PLURAL), False, ours("VmMigration", {"vmName": "absent"})),
    "nodes": (Resource("nodes", "", "v1"), True, core("Node", {})),
    "namespaces": (Resource("namespaces", "", "v1"), True, core("Namespace", {})),
    "resourcequotas": (
        Resource("resourcequotas", "", "v1"),
        False,
        core("ResourceQuota", {"spec": {"hard": {"pods": "1"}}}),
    ),
    "leases": (
        Resource("leases", "coordination.k8s.io", "v1"),
        False,
        core("Lease", {"spec": {"holderIdentity": "someone"}}, "coordination.k8s.io/v1"),
    ),
}


class Seen:
    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[str | None, str]] = []
        self._lock = threading.Lock()

    def __call__(self, kind: str | None, body: Body) -> None:
        if body["metadata"]["name"] == self.name:
            with self._lock:
                self.events.append((kind, str(body["metadata"].get("uid"))))

    def has(self, kind: str | None) -> bool:
        with self._lock:
            return any(k == kind for k, _ in self.events)


@pytest.mark.parametrize("plural", list(KINDS))
def test_a_deletion_while_the_watch_was_down_is_seen_on_the_next_list(
    control_plane: ControlPlane, kubectl: Kubectl, ns: str, plural: str
) -> None:
    resource, cluster_scoped, body = KINDS[plural]
    name = f"inf-{uuid.uuid4().hex[:8]}"
    watched = resource if cluster_scoped else Resource(resource.plural, resource.group, resource.version, ns)
    kubectl("apply", "-f", "-", input_text=yaml.safe_dump(body("" if cluster_scoped else ns, name)))
    seen = Seen(name)
    kube = Kube.from_kubeconfig(str(control_plane.kubeconfig))
    informer = Informer(
        kube, watched, seen, field_selector=f"metadata.name={name}", timeout_seconds=2, retry_seconds=0.2
    )
    informer.start()
    try:
        wait_for(lambda: seen.has(None), 30, f"the {plural} listed")
        uid = seen.events[0][1]
        assert informer.get(f"{name}" if cluster_scoped else f"{ns}/{name}") is not None
        informer.stop()
        informer.join(30)
        assert not informer.alive()
        scope = [] if cluster_scoped else ["-n", ns]
        kind = f"{resource.plural}.{resource.group}" if resource.group else resource.plural
        kubectl("delete", kind, name, *scope, "--wait=true", "--timeout=90s")
        assert ("DELETED", uid) not in seen.events  # nothing watched while it went
        informer.start()
        wait_for(lambda: ("DELETED", uid) in seen.events, 30, f"the deleted {plural} seen on the next list")
        assert informer.get(f"{name}" if cluster_scoped else f"{ns}/{name}") is None
    finally:
        informer.stop()
