"""``prefetch: AllNodes`` copies an image to every hypervisor node's cache, disk no namespace's
quota counts (issue 26, finding 11): an admin's choice. A tenant with the aggregated ``edit``
role cannot set it, on a new VmImage or on one of theirs; a user granted the RBAC verb
``prefetch`` on vmimages can (policy formation-vmm-prefetch, real tokens, real apiserver)."""

import json

import pytest

from formation_vmm.devcluster.cluster import Kubectl
from tests.support.fleet import Fleet

pytestmark = pytest.mark.controlplane


def image(ns: str, name: str, prefetch: str) -> str:
    return json.dumps(
        {
            "apiVersion": "vmm.formation.cloud/v1alpha1",
            "kind": "VmImage",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"source": {"http": {"url": "http://127.0.0.1:9/none.raw"}}, "prefetch": prefetch},
        }
    )


def test_only_an_admins_choice_prefetches_to_every_node(fleet: Fleet, ns: str) -> None:
    tenant = Kubectl(fleet.kubectl.binary, fleet.user(ns, "tenant", "edit"))
    refused = tenant.run("apply", "-f", "-", input_text=image(ns, "everywhere", "AllNodes"))
    assert refused.returncode != 0
    assert "prefetch: AllNodes copies the image to every hypervisor node" in refused.stderr
    assert "may not set it" in refused.stderr
    # On demand is theirs to create; turning it into AllNodes later is refused the same.
    tenant("apply", "-f", "-", input_text=image(ns, "mine", "OnDemand"))
    patched = tenant.run(
        "patch", "vmimage", "mine", "-n", ns, "--type=merge", "-p", '{"spec":{"prefetch":"AllNodes"}}'
    )
    assert patched.returncode != 0 and "may not set it" in patched.stderr
    # A user an admin granted the verb may.
    fleet.kubectl.apply_docs(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "prefetcher", "namespace": ns},
                "rules": [
                    {"apiGroups": ["vmm.formation.cloud"], "resources": ["vmimages"], "verbs": ["prefetch"]}
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "prefetcher", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "prefetcher"},
                "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": ns}],
            },
        ]
    )
    tenant("apply", "-f", "-", input_text=image(ns, "everywhere", "AllNodes"))
    prefetch = fleet.kubectl("get", "vmimage", "everywhere", "-n", ns, "-o", "jsonpath={.spec.prefetch}")
    assert prefetch == "AllNodes"
