"""The status of our kinds is ours (issue 26, finding 2): the controller rebinds VMs on what a
VmMigration's status says, IPAM and the agents' anti-spoofing filters follow addresses, probes
aim at them. A user whom a cluster admin granted everything on our group (``*``, subresources
included) still cannot write any status: the policy formation-vmm-status refuses it. And the
controller never reads an address back from a status, even one written by a hand it cannot
refuse (system:masters)."""

import json
from pathlib import Path
from typing import Any

import pytest

from formation_vmm.api.names import ADDRESSES_ANNOTATION
from formation_vmm.devcluster.cluster import Kubectl, service_account_kubeconfig
from tests.support.fleet import TINY, Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

GATEWAY = "10.123.0.1"


@pytest.fixture(scope="module")
def superuser(fleet: Fleet) -> Kubectl:
    """A service account holding ``*`` on every resource of our group, cluster-wide."""
    fleet.kubectl.apply_docs(
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "power-users"}},
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": "everything", "namespace": "power-users"},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "vmm-everything"},
                "rules": [{"apiGroups": ["vmm.formation.cloud"], "resources": ["*"], "verbs": ["*"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "vmm-everything"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "vmm-everything",
                },
                "subjects": [{"kind": "ServiceAccount", "name": "everything", "namespace": "power-users"}],
            },
        ]
    )
    config: Path = service_account_kubeconfig(
        fleet.kubectl, fleet.plane, "everything", namespace="power-users"
    )
    return Kubectl(fleet.kubectl.binary, config)


def patch_status(kubectl: Kubectl, kind: str, name: str, ns: str, status: dict[str, Any]) -> Any:
    return kubectl.run(
        "patch", kind, name, "-n", ns, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}),
    )  # fmt: skip


def test_a_user_granted_everything_writes_no_status(fleet: Fleet, ns: str, superuser: Kubectl) -> None:
    fleet.apply_vm(ns, "victim", nodeSelector={"zone": "a"}, **TINY)
    fleet.wait_phase(ns, "victim", "Running")
    fleet.apply(
        {
            "apiVersion": "vmm.formation.cloud/v1alpha1",
            "kind": "VmMigration",
            "metadata": {"name": "forged", "namespace": ns},
            "spec": {"vmName": "victim"},
        }
    )
    # RBAC says yes: what stops it is the policy.
    for resource in ("vmmigrations/status", "virtualmachines/status", "vmsnapshots/status"):
        assert (
            superuser("auth", "can-i", "patch", f"{resource}.vmm.formation.cloud", "-n", ns).strip() == "yes"
        )
    moved = {"phase": "Migrating", "domainMoved": True, "sourceNode": "node-a", "targetNode": "node-b"}
    attempts = [
        ("vmmig", "forged", moved),
        ("vm", "victim", {"interfaces": [{"name": "eth0", "ipAddress": GATEWAY, "infoSource": "ipam"}]}),
        ("vm", "victim", {"nodeName": "node-b"}),
    ]
    for kind, name, status in attempts:
        proc = patch_status(superuser, kind, name, ns, status)
        assert proc.returncode != 0, f"{kind} {name} status {status} was written"
        assert "is written by Formation VMM alone" in proc.stderr, proc.stderr
    vm = fleet.vm(ns, "victim")
    assert vm["metadata"]["labels"]["vmm.formation.cloud/node"] == "node-a"
    assert vm["status"]["nodeName"] == "node-a"


def test_the_controller_never_takes_an_address_from_a_status(fleet: Fleet, ns: str) -> None:
    """A status claiming the gateway's address through IPAM (written as system:masters, the one
    hand the policy lets through): the VM is bound with an address IPAM chose, and shows that."""
    fleet.apply_vm(ns, "claims", nodeSelector={"zone": "nowhere"}, networks=[{"name": "eth0"}], **TINY)
    fleet.wait_vm(ns, "claims", lambda vm: vm.get("status", {}).get("phase") == "Pending", "pending")
    forged = {
        "interfaces": [{"name": "eth0", "network": "default", "ipAddress": GATEWAY, "infoSource": "ipam"}]
    }
    assert patch_status(fleet.kubectl, "vm", "claims", ns, forged).returncode == 0
    fleet.kubectl("patch", "vm", "claims", "-n", ns, "--type=merge", "-p",
                  json.dumps({"spec": {"nodeSelector": {"zone": "a"}}}))  # fmt: skip
    vm = fleet.wait_phase(ns, "claims", "Running")
    given = vm["metadata"]["annotations"][ADDRESSES_ANNOTATION]
    assert given.startswith("eth0=default/10.123.") and not given.endswith(f"/{GATEWAY}"), given
    shown = wait_for(
        lambda: next(
            (
                i
                for i in fleet.vm(ns, "claims")["status"].get("interfaces", [])
                if i.get("ipAddress") != GATEWAY
            ),
            None,
        ),
        30,
        "the status to show the assigned address",
    )
    assert shown["ipAddress"] == given.rsplit("/", 1)[1] and shown["infoSource"].startswith("ipam")
