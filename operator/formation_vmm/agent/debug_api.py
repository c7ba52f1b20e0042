"""Read-only endpoints of the replaced vmm-service, for node-local debugging: what libvirt on
this node holds, straight from libvirt (not from the Kubernetes API)."""

import asyncio
from typing import Any

from aiohttp import web

from formation_vmm.agent.hypervisor import DomainInfo, Hypervisor


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


def routes(hypervisor: Hypervisor) -> list[web.RouteDef]:
    async def vms(_: web.Request) -> web.Response:
        domains = await asyncio.get_running_loop().run_in_executor(None, hypervisor.owned_domains)
        return web.json_response([_describe(d) for d in domains])

    async def vm(request: web.Request) -> web.Response:
        domains = await asyncio.get_running_loop().run_in_executor(None, hypervisor.owned_domains)
        wanted = request.match_info["vm_id"]
        for info in domains:
            if info.owner is not None and wanted in (info.owner.uid, info.name):
                return web.json_response(_describe(info))
        return web.json_response({"error": f"no VM {wanted} on this node"}, status=404)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "libvirt": hypervisor.uri})

    return [web.get("/health", health), web.get("/vms", vms), web.get("/vms/{vm_id}", vm)]
