"""Secrets reach a node only sealed to its agent's key, through the real controller and agents
(whose RBAC grants them no Secret at all): cloud-init user data from a Secret lands in the seed,
a VmImage's Authorization reaches the server, the status shows ciphertext only, and a VM whose
Secret is missing waits with a reason until it exists."""

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support import image_files as files
from tests.support.fleet import TINY, Fleet, condition
from tests.support.image_server import ImageServer, serve
from tests.support.seeds import seed_user_data
from tests.support.waiting import get_json, wait_for

pytestmark = pytest.mark.controlplane

ON_A = {**TINY, "nodeSelector": {"zone": "a"}}
USER_DATA = "#cloud-config\npassword: hunter2-from-a-secret\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    root = tmp_path_factory.mktemp("private")
    files.raw(root / "private.raw", marker=b"private")
    with serve(root) as srv:
        yield srv


def apply_secret(fleet: Fleet, namespace: str, name: str, key: str, value: str) -> None:
    fleet.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {key: base64.b64encode(value.encode()).decode()},
        }
    )


def user_data_on(fleet: Fleet, node: str, namespace: str, name: str, uid: str) -> str:
    return seed_user_data(fleet.node_dir(node) / "run" / namespace / name / uid / "cloud-init.iso")


def test_user_data_from_a_secret_reaches_the_seed_sealed_on_the_way(fleet: Fleet, ns: str) -> None:
    apply_secret(fleet, ns, "cloud", "userdata", USER_DATA)
    fleet.apply_vm(ns, "sealed", cloudInit={"userDataSecretRef": {"name": "cloud"}}, **ON_A)
    vm = fleet.wait_phase(ns, "sealed", "Running", 60)
    sealed = vm["status"]["sealedUserData"]
    assert sealed["node"] == vm["status"]["nodeName"] == "node-a"
    assert "hunter2" not in json.dumps(vm) and "hunter2" not in base64.b64decode(sealed["data"]).decode(
        "latin-1"
    )
    assert user_data_on(fleet, "node-a", ns, "sealed", vm["metadata"]["uid"]) == USER_DATA


def test_a_vm_whose_secret_is_missing_waits_and_says_why(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "patient", cloudInit={"userDataSecretRef": {"name": "later"}}, **ON_A)

    def waiting() -> dict[str, Any] | None:
        vm = fleet.vm(ns, "patient")
        return vm if condition(vm, "ImageReady").get("reason") == "SecretNotFound" else None

    vm = wait_for(waiting, 60, "the VM to wait for its Secret")
    assert vm["status"]["phase"] == "Provisioning"
    assert f"Secret {ns}/later does not exist" in condition(vm, "ImageReady")["message"]
    apply_secret(fleet, ns, "later", "userdata", USER_DATA)
    vm = fleet.wait_phase(ns, "patient", "Running", 60)
    assert user_data_on(fleet, "node-a", ns, "patient", vm["metadata"]["uid"]) == USER_DATA


def test_an_image_behind_authorization_is_fetched_with_the_sealed_value(
    fleet: Fleet, ns: str, server: ImageServer
) -> None:
    apply_secret(fleet, ns, "registry", "authorization", server.token)
    fleet.apply(
        {
            "apiVersion": "vmm.formation.cloud/v1alpha1",
            "kind": "VmImage",
            "metadata": {"name": "private", "namespace": ns},
            "spec": {
                "source": {
                    "http": {"url": server.url("/auth/private.raw"), "secretRef": {"name": "registry"}}
                }
            },
        }
    )
    fleet.apply_vm(ns, "reader", disks=[{"name": "root", "image": "private"}], **ON_A)
    fleet.wait_phase(ns, "reader", "Running", 60)
    image = get_json(fleet.kubectl, "vmimg", "private", "-n", ns)
    [entry] = image["status"]["credentials"]
    assert entry["node"] == "node-a" and "data" in entry
    assert server.token not in yaml.safe_dump(image)
    sent = [
        h.get("Authorization")
        for h, path in zip(server.headers, server.requests, strict=True)
        if "auth/" in path
    ]
    assert sent and set(sent) == {server.token}
