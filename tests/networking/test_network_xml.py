"""VmNetwork -> libvirt network XML (domain/network_xml.py), and the selector match."""

import pytest

from formation_vmm.api.models import LabelSelector, VmNetworkSpec
from formation_vmm.api.names import bridge_device
from formation_vmm.api.selectors import matches
from formation_vmm.domain.network_xml import DhcpHost, dhcp_hosts, network_xml, shape

pytestmark = pytest.mark.pure


def test_a_nat_network_with_static_dhcp_entries() -> None:
    spec = VmNetworkSpec(mode="nat", subnet="10.123.0.0/16")
    hosts = (DhcpHost("52:54:00:00:00:02", "10.123.0.3"), DhcpHost("52:54:00:00:00:01", "10.123.0.2"))
    xml = network_xml("default", spec, hosts)
    assert xml == (
        '<network><name>vmm-default</name><forward mode="nat" />'
        f'<bridge name="{bridge_device("default")}" stp="on" delay="0" />'
        '<ip address="10.123.0.1" netmask="255.255.0.0"><dhcp>'
        '<range start="10.123.0.2" end="10.123.255.254" />'
        '<host mac="52:54:00:00:00:01" ip="10.123.0.2" />'
        '<host mac="52:54:00:00:00:02" ip="10.123.0.3" />'
        "</dhcp></ip></network>"
    )
    assert dhcp_hosts(xml) == set(hosts)
    assert shape(xml) == ("nat", bridge_device("default"), "10.123.0.1", "255.255.0.0")


def test_isolated_has_no_forward_and_bridge_joins_the_admins_bridge() -> None:
    isolated = network_xml("lab", VmNetworkSpec(mode="isolated", subnet="10.9.0.0/24"))
    assert "<forward" not in isolated and 'address="10.9.0.1"' in isolated
    bridged = network_xml("lan", VmNetworkSpec(mode="bridge", bridge="br0"))
    assert bridged == '<network><name>vmm-lan</name><forward mode="bridge" /><bridge name="br0" /></network>'


def test_bridge_devices_fit_linux_and_differ_per_network() -> None:
    names = {bridge_device(f"net-{i}") for i in range(1000)}
    assert len(names) == 1000 and all(len(n) <= 15 for n in names)


def test_namespace_selectors_match_as_kubernetes_does() -> None:
    labels = {"team": "a", "tier": "prod"}
    assert matches(None, labels) and matches(LabelSelector(), {})
    assert matches(LabelSelector(match_labels={"team": "a"}), labels)
    assert not matches(LabelSelector(match_labels={"team": "b"}), labels)
    expr = LabelSelector.model_validate(
        {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod", "stage"]}]}
    )
    assert matches(expr, labels) and not matches(expr, {"team": "a"})
    assert not matches(
        LabelSelector.model_validate({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}),
        labels,
    )
    assert matches(
        LabelSelector.model_validate(
            {"matchExpressions": [{"key": "x", "operator": "NotIn", "values": ["y"]}]}
        ),
        labels,
    )
    assert not matches(
        LabelSelector.model_validate({"matchExpressions": [{"key": "x", "operator": "Exists"}]}), labels
    )
