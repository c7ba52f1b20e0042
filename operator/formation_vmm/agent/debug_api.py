"""Read-only endpoints of the replaced vmm-service, for node-local debugging, straight from
libvirt and the node's files (not from the Kubernetes API); and the serial console log that
`kubectl vm console` follows."""

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from formation_vmm.agent.hypervisor import Hypervisor
from formation_vmm.agent.state import DomainInfo
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.health import Health
from formation_vmm.images.cache import ImageCache

# How often a followed console log is checked for new output.
FOLLOW_POLL_SECONDS = 0.2


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


def routes(hypervisor: Hypervisor, layout: NodeLayout, health: Health) -> list[web.RouteDef]:
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
        path = layout.console_log(info.owner)
        follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
        response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await response.prepare(request)
        await _stream(path, response, follow)
        return response

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

    return [
        web.get("/health", health_),
        web.get("/vms", vms),
        web.get("/vms/{vm_id}", vm),
        web.get("/vms/{vm_id}/console", console),
        web.get("/images", images),
    ]


async def _stream(path: Path, response: web.StreamResponse, follow: bool) -> None:
    offset = 0
    while True:
        try:
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            await response.write(chunk)
        elif not follow:
            return
        else:
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
