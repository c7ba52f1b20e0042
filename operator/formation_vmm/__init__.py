"""Formation VMM: virtual machines on Kubernetes with libvirt."""

__version__ = "0.1.0"
