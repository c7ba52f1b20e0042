"""libvirt nwfilters, for the node guard (domain/guard_xml.py): defined, and redefined in place
(libvirt keeps a filter's UUID; a definition without it would be refused as another filter of
the same name)."""

from collections.abc import Callable

import libvirt

from formation_vmm.agent.hypervisor.connection import Hypervisor, hypervisor_error


class HypervisorFilters:
    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hypervisor = hypervisor

    def define(self, name: str, render: Callable[[str | None], str]) -> None:
        """Define filter ``name`` as ``render(its UUID if it exists)`` returns it."""
        conn = self.hypervisor.connection()
        try:
            try:
                uuid: str | None = str(conn.nwfilterLookupByName(name).UUIDString())
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_NWFILTER:
                    raise
                uuid = None
            conn.nwfilterDefineXML(render(uuid))
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"cannot define nwfilter {name}") from exc
