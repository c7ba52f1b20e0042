"""The per-node agent: turns the VMs bound to its node into libvirt domains and reports status."""
