"""The agent's HTTP endpoints beyond the probes.

On its public port (``VMM_API_PORT``): ``/health`` (the replaced service's check); a VM's
serial console at ``/vms/{namespace}/{name}/console`` (what ``kubectl vm console`` follows) and
the counters of a namespace's VMs on this node at ``/namespaces/{namespace}/vmstats`` (what
``kubectl vm top`` reads), each for callers allowed to read them (access.py).

On the node's loopback only (``VMM_DEBUG_PORT``, off unless set): the replaced vmm-service's
read-only endpoints, straight from libvirt and the node's files (``/vms``, ``/vms/{id}``,
``/vms/{id}/console``, ``/images``). They show every tenant's VMs and consoles, so they answer
only to whoever is on the node already.

Console logs are read in bounded chunks off the event loop: a guest that floods its serial port
makes a big file, never a big read."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from formation_vmm.agent.access import CallerAccess, Denied
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.hypervisor.networks import HypervisorNetworks
from formation_vmm.agent.state import DomainInfo
from formation_vmm.agent.vm_metrics import VmLabels, summary
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.health import Health
from formation_vmm.images.cache import ImageCache

# How often a followed console log is checked for new output.
FOLLOW_POLL_SECONDS = 0.2
# The most of a console log read at once.
CHUNK = 64 * 1024


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


def public_routes(
    hypervisor: Hypervisor,
    layout: NodeLayout,
    health: Health,
    access: CallerAccess,
    owners: Callable[[], dict[str, VmLabels]],
) -> list[web.RouteDef]:
    async def vmstats(request: web.Request) -> web.Response:
        namespace = request.match_info["namespace"]
        try:
            await access.acheck(request.headers.get("Authorization"), namespace, "", "stats")
        except Denied as denied:
            return web.Response(status=denied.status, text=denied.message + "\n")
        try:
            stats = await asyncio.to_thread(hypervisor.all_domain_stats)
        except HypervisorError as exc:
            return web.Response(status=503, text=f"libvirt does not answer: {exc}\n")
        labels = owners()
        body = [
            {"name": labels[domain].name, **summary(values)}
            for domain, values in stats
            if domain in labels and labels[domain].namespace == namespace
        ]
        return web.json_response({"at": time.time(), "vms": body})

    async def console(request: web.Request) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        try:
            await access.acheck(request.headers.get("Authorization"), namespace, name)
        except Denied as denied:
            return web.Response(status=denied.status, text=denied.message + "\n")
        for info in await asyncio.to_thread(hypervisor.owned_domains):
            owner = info.owner
            if owner is not None and (owner.namespace, owner.name) == (namespace, name):
                return await _serve_console(request, layout.console_log(owner))
        raise web.HTTPNotFound(text=f"VM {namespace}/{name} has no domain on this node\n")

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
        web.get("/vms/{namespace}/{name}/console", console),
        web.get("/namespaces/{namespace}/vmstats", vmstats),
    ]


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
        return await _serve_console(request, layout.console_log(info.owner))

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


async def _serve_console(request: web.Request, path: Path) -> web.StreamResponse:
    """The log from ``offset`` (default 0: where a client that lost its connection resumes);
    with ``follow``, then whatever the guest prints next, until the client leaves."""
    follow = request.query.get("follow", "false").lower() in ("1", "true", "yes")
    raw = request.query.get("offset", "0")
    if not raw.isdecimal() or len(raw) > 18:
        raise web.HTTPBadRequest(text=f"offset must be a number of bytes, not {raw[:40]!r}\n")
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await response.prepare(request)
    await _stream(path, response, follow, int(raw))
    return response


async def _stream(path: Path, response: web.StreamResponse, follow: bool, offset: int = 0) -> None:
    while True:
        start, chunk = await asyncio.to_thread(_read_chunk, path, offset)
        if chunk:
            offset = start + len(chunk)
            await response.write(chunk)
        elif not follow:
            return
        else:
            await asyncio.sleep(FOLLOW_POLL_SECONDS)


def _read_chunk(path: Path, offset: int) -> tuple[int, bytes]:
    """At most CHUNK bytes of the log from ``offset``, and where they start: a log rotated
    meanwhile (now shorter than ``offset``) is read again from its start."""
    try:
        with path.open("rb") as f:
            if offset > f.seek(0, 2):
                offset = 0
            f.seek(offset)
            return offset, f.read(CHUNK)
    except FileNotFoundError:
        return offset, b""
