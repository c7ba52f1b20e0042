"""The libvirt boundary: the only package that imports libvirt. libvirt's errors become
``HypervisorError`` here, once (``HypervisorUnavailableError`` when libvirtd cannot be reached)."""

from formation_vmm.agent.hypervisor.connection import (
    DomainListener,
    Hypervisor,
    HypervisorError,
    HypervisorUnavailableError,
    probe,
    start_event_loop,
)

__all__ = [
    "DomainListener",
    "Hypervisor",
    "HypervisorError",
    "HypervisorUnavailableError",
    "probe",
    "start_event_loop",
]
