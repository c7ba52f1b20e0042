"""Pure translation between VirtualMachine specs and libvirt domain XML (no libvirt, no kopf)."""
