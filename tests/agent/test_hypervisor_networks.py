"""Reading the node's libvirt networks while the agent removes one (libvirt's test driver)."""

import uuid

import libvirt
import pytest

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.hypervisor.networks import HypervisorNetworks, _state_or_none

pytestmark = pytest.mark.libvirt


def _network_xml(name: str) -> str:
    return f"<network><name>{name}</name><bridge name='vb{name[-8:]}'/></network>"


def test_a_network_removed_after_the_listing_named_it_is_left_out() -> None:
    """The agent's /networks answered 500 when a VM's last network went between libvirt's
    listing and the reading of its XML (seen in test_networks): a stale handle."""
    hv = Hypervisor("test:///default")
    try:
        kept, gone = f"vmm-{uuid.uuid4().hex[:8]}", f"vmm-{uuid.uuid4().hex[:8]}"
        conn = hv.connection()
        conn.networkDefineXML(_network_xml(kept))
        conn.networkDefineXML(_network_xml(gone))
        listed = {str(n.name()): n for n in conn.listAllNetworks()}
        conn.networkLookupByName(gone).undefine()  # after the listing, before the reading
        assert _state_or_none(listed[gone], gone) is None
        state = _state_or_none(listed[kept], kept)
        assert state is not None and state.name == kept and f"<name>{kept}</name>" in state.xml
        assert kept in HypervisorNetworks(hv).ours() and gone not in HypervisorNetworks(hv).ours()
        conn.networkLookupByName(kept).undefine()
        with pytest.raises(libvirt.libvirtError):
            listed[kept].XMLDesc(0)  # the handle is stale: the case the listing must survive
    finally:
        hv.close()
