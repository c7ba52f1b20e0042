"""The cluster controller: places VMs on hypervisor nodes and watches node health."""
