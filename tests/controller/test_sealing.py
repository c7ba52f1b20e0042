"""Sealed secrets (sealing.py and the sealer's decisions): a value sealed for one node opens
with that node's key only, for the object it was sealed for only, and not once tampered with."""

import base64
from pathlib import Path
from typing import Any

import pytest

from formation_vmm.api.models import SealedValue, VmImage, to_wire
from formation_vmm.api.names import (
    AGENT_KEY_ANNOTATION,
    IMAGE_PLURAL,
    MIGRATION_PLURAL,
    NODE_LABEL,
    VM_PLURAL,
)
from formation_vmm.controller.sealer import Sealer, Seen, sealed_for, unchanged
from formation_vmm.controller.vm_facts import INDEXERS, vm_facts
from formation_vmm.informer import Informer
from formation_vmm.kube import Resource
from formation_vmm.sealing import NodeKey, SealError, seal, user_data_context

pytestmark = pytest.mark.pure

CONTEXT = user_data_context("team-a", "web", "uid-1", "cloud", "userdata")


def test_a_value_opens_with_its_nodes_key_and_the_key_survives_a_restart(tmp_path: Path) -> None:
    key = NodeKey(tmp_path / "node.key")
    sealed = seal(key.public_b64, b"#cloud-config\npassword: s3cret\n", CONTEXT)
    assert b"s3cret" not in base64.b64decode(sealed)
    again = NodeKey(tmp_path / "node.key")  # a restarted agent
    assert again.public == key.public
    assert again.open(sealed, CONTEXT) == b"#cloud-config\npassword: s3cret\n"
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600


def test_another_nodes_key_another_object_or_a_changed_byte_do_not_open_it(tmp_path: Path) -> None:
    mine = NodeKey(tmp_path / "a.key")
    theirs = NodeKey(tmp_path / "b.key")
    sealed = seal(mine.public_b64, b"token", CONTEXT)
    with pytest.raises(SealError):
        theirs.open(sealed, CONTEXT)
    # Copied into another VM's status (same namespace, another uid): refused.
    with pytest.raises(SealError):
        mine.open(sealed, user_data_context("team-a", "web", "uid-2", "cloud", "userdata"))
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 1
    with pytest.raises(SealError):
        mine.open(base64.b64encode(bytes(raw)).decode(), CONTEXT)
    with pytest.raises(SealError):
        mine.open("not base64 at all!", CONTEXT)


def test_what_a_node_gets_and_when_it_is_sealed_again(tmp_path: Path) -> None:
    key = NodeKey(tmp_path / "a.key")
    secret = (b"value", "41", None)
    first = sealed_for("node-a", key.public_b64, secret, CONTEXT)
    assert first.key_id == key.id and first.secret_version == "41" and first.error is None
    assert first.data is not None and key.open(first.data, CONTEXT) == b"value"
    # Sealing again gives other bytes; what matters is node, key and Secret version.
    assert unchanged(first, sealed_for("node-a", key.public_b64, secret, CONTEXT))
    assert not unchanged(first, sealed_for("node-a", key.public_b64, (b"value2", "42", None), CONTEXT))
    other = NodeKey(tmp_path / "a2.key")  # the node's agent got a new key (state lost)
    assert not unchanged(first, sealed_for("node-a", other.public_b64, secret, CONTEXT))
    assert not unchanged(None, first)
    # No key published yet, or no Secret: a reason, and no data.
    waiting = sealed_for("node-b", None, secret, CONTEXT)
    assert waiting == SealedValue(
        node="node-b", error="the agent of node node-b has not published its key yet"
    )
    missing = sealed_for(
        "node-a", key.public_b64, (None, None, "Secret team-a/cloud does not exist"), CONTEXT
    )
    assert missing.data is None and missing.error == "Secret team-a/cloud does not exist"


def test_a_seal_patched_over_an_error_clears_it(tmp_path: Path) -> None:
    """A status patch merges objects: the fresh seal must say error: null, or the stale error
    stays beside the data, and the seal never looks done (the controller rewrote it forever)."""
    key = NodeKey(tmp_path / "a.key")
    missing = sealed_for("node-a", key.public_b64, (None, None, "Secret t/cloud does not exist"), CONTEXT)
    fresh = sealed_for("node-a", key.public_b64, (b"value", "41", None), CONTEXT)
    merged = {**to_wire(missing), **to_wire(fresh)}
    merged = {k: v for k, v in merged.items() if v is not None}  # what the apiserver keeps
    assert unchanged(SealedValue.model_validate(merged), fresh)
    assert to_wire(missing)["data"] is None and to_wire(missing)["keyId"] is None


def stores() -> Seen:
    """The informers the sealer reads, never started: their stores filled by hand, as their
    lists and watches would (tests/controlplane has the real ones)."""
    nowhere: Any = None
    return Seen(
        vms=Informer(nowhere, VM_PLURAL, transform=vm_facts, indexers=INDEXERS),
        nodes=Informer(nowhere, Resource("nodes", "", "v1")),
        images=Informer(nowhere, IMAGE_PLURAL),
        migrations=Informer(nowhere, MIGRATION_PLURAL),
    )


def test_a_migrations_target_fetches_the_vms_images_with_their_credentials() -> None:
    """The nodes an image's credentials are sealed for: those of the VMs that use it, and the
    target of a migration of such a VM while it is under way (it fetches the bases first)."""
    seen = stores()
    sealer = Sealer(None, None, None, None, seen, migrations=object())  # type: ignore[arg-type]
    vm = {
        "metadata": {"uid": "u1", "namespace": "team-a", "name": "web", "labels": {NODE_LABEL: "n1"}},
        "spec": {"disks": [{"name": "root", "image": "private"}]},
    }
    seen.vms.store.put("team-a/web", vm_facts(vm))
    image = VmImage.model_validate(
        {
            "metadata": {"namespace": "team-a", "name": "private"},
            "spec": {"source": {"http": {"url": "https://x/y"}}},
        }
    )
    assert sealer.nodes_fetching(image) == {"n1"}
    migration = {
        "metadata": {"uid": "m1", "namespace": "team-a", "name": "move"},
        "spec": {"vmName": "web"},
        "status": {"phase": "Preparing", "sourceNode": "n1", "targetNode": "n2"},
    }
    seen.migrations.store.put("team-a/move", migration)
    assert sealer.nodes_fetching(image) == {"n1", "n2"}
    seen.migrations.store.put(
        "team-a/move", {**migration, "status": {**migration["status"], "phase": "Failed"}}
    )
    assert sealer.nodes_fetching(image) == {"n1"}


def test_only_a_change_of_what_sealing_reads_asks_for_a_pass() -> None:
    """The informers hand the sealer what their stores kept before and after each event: an
    agent's status write (every few seconds per VM) asks for no pass; a new node, image or
    Secret reference does."""
    sealer = Sealer(None, None, None, None, stores())  # type: ignore[arg-type]
    web: dict[str, Any] = {
        "metadata": {"uid": "u1", "namespace": "team-a", "name": "web", "labels": {NODE_LABEL: "n1"}},
        "spec": {"cloudInit": {"userDataSecretRef": {"name": "cloud"}}},
        "status": {"phase": "Running"},
    }
    sealer._dirty = False
    sealer.vm_changed(vm_facts(web), vm_facts({**web, "status": {"phase": "Stopped"}}))
    assert not sealer._dirty
    moved = {**web, "metadata": {**web["metadata"], "labels": {NODE_LABEL: "n2"}}}
    sealer.vm_changed(vm_facts(web), vm_facts(moved))
    assert sealer._dirty
    sealer._dirty = False
    node = {"metadata": {"name": "n1", "annotations": {AGENT_KEY_ANNOTATION: "a2V5"}}}
    sealer.node_changed(
        node, {"metadata": {"name": "n1", "annotations": {"other": "x", AGENT_KEY_ANNOTATION: "a2V5"}}}
    )
    assert not sealer._dirty
    sealer.node_changed(node, None)  # the node went: its VMs' values are sealed for nobody now
    assert sealer._dirty
