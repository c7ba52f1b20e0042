"""What a source believes of the migration endpoint a target's Node publishes: the annotation is
written by that node's agent, which may be a compromised one, and the direct form's URI is handed
to the source's own libvirtd. One reader decides; this is its table of refused shapes."""

import json

import pytest

from formation_vmm.agent.migration.migration_work import Endpoint, local_socket
from formation_vmm.api.names import MIGRATION_ENDPOINT_ANNOTATION

pytestmark = pytest.mark.pure


def node(annotation: object) -> dict[str, object]:
    text = annotation if isinstance(annotation, str) else json.dumps(annotation)
    return {"metadata": {"annotations": {MIGRATION_ENDPOINT_ANNOTATION: text}}}


DIRECT = {"libvirt": "qemu+unix:///system?socket=/run/vmm/b/libvirt-sock", "sockets": "/run/vmm/b/mig"}


def test_the_relay_form_is_read_always() -> None:
    published = {"relay": "10.0.0.2:7443", "certificate": "PEM"}
    assert Endpoint.of(node(published)) == Endpoint(relay="10.0.0.2:7443", certificate="PEM")
    assert Endpoint.of(node({"relay": "[fd00::2]:7443", "certificate": "PEM"})) is not None


def test_the_direct_form_only_where_this_node_migrates_directly() -> None:
    assert Endpoint.of(node(DIRECT)) is None
    found = Endpoint.of(node(DIRECT), allow_direct=True)
    assert found is not None and found.libvirt == DIRECT["libvirt"]


@pytest.mark.parametrize(
    "published",
    [
        # Transports our libvirtd would open wherever the peer says.
        {**DIRECT, "libvirt": "qemu+ssh://attacker.example/system"},
        {**DIRECT, "libvirt": "qemu+tcp://10.0.0.9/system"},
        {**DIRECT, "libvirt": "qemu+ext:///system?command=/bin/sh"},
        {**DIRECT, "libvirt": "qemu+unix:///system?socket=/run/a&command=/bin/sh"},
        {**DIRECT, "libvirt": "qemu+unix:///system?socket=relative/sock"},
        {**DIRECT, "libvirt": "qemu+unix:///system?socket=/run/../etc/sock"},
        {**DIRECT, "libvirt": "qemu:///system"},
        {**DIRECT, "sockets": "relative"},
        {**DIRECT, "sockets": "/run/../../tmp"},
        {"relay": "host:7443;rm -rf /", "certificate": "PEM"},
        {"relay": "no-port", "certificate": "PEM"},
        {"relay": "10.0.0.2:7443"},
        ["not", "an", "object"],
        "{not json",
    ],
)
def test_refused_shapes(published: object) -> None:
    assert Endpoint.of(node(published), allow_direct=True) is None


def test_local_socket() -> None:
    assert str(local_socket("qemu+unix:///system?socket=/run/l.sock")) == "/run/l.sock"
    assert local_socket("qemu+unix:///session?socket=/run/l.sock") is None
