"""Which VMs may use which VmNetworks (controller/binding/networks.py), as the binder asks."""

import pytest

from formation_vmm.controller.binding.networks import NetworkCatalog
from tests.support.factories import make_vm

pytestmark = pytest.mark.pure


def network(name: str, **spec: object) -> dict[str, object]:
    return {"metadata": {"name": name}, "spec": {"mode": "nat", "subnet": "10.10.0.0/24", **spec}}


def test_unknown_and_not_allowed_networks_are_refused_with_a_reason() -> None:
    catalog = NetworkCatalog()
    catalog.network_event("ADDED", network("default"))
    catalog.network_event("ADDED", network("prod", namespaceSelector={"matchLabels": {"tier": "prod"}}))
    catalog.namespace_event("ADDED", {"metadata": {"name": "team-a", "labels": {"tier": "dev"}}})
    assert catalog.refusal(make_vm(namespace="team-a", networks=[{"name": "eth0"}])) is None
    unknown = catalog.refusal(make_vm(namespace="team-a", networks=[{"name": "eth0", "network": "storage"}]))
    assert unknown is not None and unknown.reason == "NetworkNotFound"
    assert "no VmNetwork of that name (networks: default, prod)" in unknown.message
    denied = catalog.refusal(make_vm(namespace="team-a", networks=[{"name": "eth0", "network": "prod"}]))
    assert denied is not None and denied.reason == "NetworkNotAllowed"
    assert "which namespace 'team-a' may not use" in denied.message
    catalog.namespace_event("MODIFIED", {"metadata": {"name": "team-a", "labels": {"tier": "prod"}}})
    assert (
        catalog.refusal(make_vm(namespace="team-a", networks=[{"name": "eth0", "network": "prod"}])) is None
    )
    catalog.network_event("DELETED", network("prod"))
    gone = catalog.refusal(make_vm(namespace="team-a", networks=[{"name": "eth0", "network": "prod"}]))
    assert gone is not None and gone.reason == "NetworkNotFound"


def test_ranges_come_from_nat_and_isolated_networks_only() -> None:
    catalog = NetworkCatalog()
    catalog.network_event("ADDED", network("default"))
    catalog.network_event("ADDED", {"metadata": {"name": "lan"}, "spec": {"mode": "bridge", "bridge": "br0"}})
    ranges = catalog.ranges()
    assert ranges["lan"] is None and ranges["default"] is not None and ranges["default"].size == 253
