"""VmNetworks on this node: the libvirt networks made from them, their DHCP entries, and the
nwfilters that keep guests off the node's own ports."""
