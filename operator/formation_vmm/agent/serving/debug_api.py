"""The agent's HTTP endpoints beyond the probes.

On its public port (``VMM_API_PORT``): ``/health`` (the replaced service's check). Consoles and
counters are served to the controller only, on the access port (controller_api.py).

On the node's loopback only (``VMM_DEBUG_PORT``, off unless set): the replaced vmm-service's
read-only endpoints, straight from libvirt and the node's files (``/vms``, ``/vms/{id}``,
``/vms/{id}/console``, ``/images``). They show every tenant's VMs and consoles, so they answer
only to whoever is on the node already."""

import asyncio
from typing import Any

from aiohttp import web

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.hypervisor.networks import HypervisorNetworks
from formation_vmm.agent.serving import console_log
from formation_vmm.agent.state import DomainInfo
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.health import Health
from formation_vmm.images.cache import ImageCache


def _describe(info: DomainInfo) -> dict[str, Any]:
    owner = info.owner
    return {
        "id": owner.uid if owner else None,
        "namespace": owner.namespace if owner else None,
        "name": owner.name if owner else None,
        "domain": info.name,
        "uuid": info.uuid,
        "state": info.actual.state.value,
        "vcpus": info.vcpus,
        "memoryKiB": info.memory_kib,
    }


def public_routes(hypervisor: Hypervisor, health: Health) -> list[web.RouteDef]:
    async def health_(_: web.Request) -> web.Response:
        """The replaced service's health check, telling the truth: libvirt reachable, the API
        watch delivering, the heartbeat recent (what /readyz checks), as JSON."""
        problems = await asyncio.to_thread(health.not_ready)
        body = {
            "status": "ok" if not problems else "unhealthy",
            "libvirt": hypervisor.uri,
            "problems": problems,
        }
        return web.json_response(body, status=200 if not problems else 503)

    return [web.get("/health", health_)]


def node_local_routes(
    hypervisor: Hypervisor, layout: NodeLayout, networks: HypervisorNetworks | None = None
) -> list[web.RouteDef]:
    async def owned() -> list[DomainInfo]:
        return await asyncio.to_thread(hypervisor.owned_domains)

    async def find(request: web.Request) -> DomainInfo:
        wanted = request.match_info["vm_id"]
        for info in await owned():
            if info.owner is not None and wanted in (info.owner.uid, info.name):
                return info
        raise web.HTTPNotFound(text=f"no VM {wanted} on this node\n")

    async def vms(_: web.Request) -> web.Response:
        return web.json_response([_describe(d) for d in await owned()])

    async def vm(request: web.Request) -> web.Response:
        return web.json_response(_describe(await find(request)))

    async def console(request: web.Request) -> web.StreamResponse:
        info = await find(request)
        assert info.owner is not None
        return await console_log.serve(request, layout.console_log(info.owner))

    async def images(_: web.Request) -> web.Response:
        """Image files on this node: hostPath sources, and the cached bases with what the
        import found (format, sizes); the cache's bookkeeping files are left out."""
        root = layout.images_dir
        cache = ImageCache(layout.cache_dir)
        entries: list[dict[str, object]] = []
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if not path.is_file() or path.is_symlink():
                    continue
                entries.append({"path": str(path.relative_to(root)), "size": path.stat().st_size})
        for sha in sorted(cache.blobs_on_disk()):
            base = cache.lookup(sha)
            if base is not None:
                entries.append(
                    {
                        "cached": str(base.path),
                        "size": base.size,
                        "sha256": base.sha256,
                        "format": base.format,
                        "virtualSize": base.virtual_size,
                    }
                )
        return web.json_response(entries)

    async def libvirt_networks(_: web.Request) -> web.Response:
        """The libvirt networks made from VmNetworks: name, state, XML (with DHCP entries)."""
        found = await asyncio.to_thread(networks.ours) if networks is not None else {}
        return web.json_response(
            {name: {"active": n.active, "autostart": n.autostart, "xml": n.xml} for name, n in found.items()}
        )

    return [
        web.get("/vms", vms),
        web.get("/vms/{vm_id}", vm),
        web.get("/vms/{vm_id}/console", console),
        web.get("/images", images),
        web.get("/networks", libvirt_networks),
    ]
