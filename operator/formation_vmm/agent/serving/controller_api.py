"""What the agent serves the controller on its access port (``VMM_ACCESS_PORT``): a VM's serial
console and its counters, which the controller hands to users behind the apiserver
(controller/serving/subresources.py). Users' requests end at the apiserver; none of their credentials
reaches a node.

TLS both ways. The agent shows the certificate it publishes on its Node (the controller trusts
exactly that one), and answers only a client holding the certificate the APIService of our
aggregated API names in its caBundle (which only the controller may set): the request itself
carries no credential, so a compromised node has nothing to replay at another. The controller
has already asked the apiserver whether the user may (a SubjectAccessReview); the agent serves
only VMs whose domains it runs."""

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import web

from formation_vmm import tls
from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.migration.relay import Identity
from formation_vmm.agent.serving import console_log
from formation_vmm.agent.state import DomainInfo
from formation_vmm.agent.vms.vm_metrics import summary
from formation_vmm.api.names import SUBRESOURCES_API_SERVICE
from formation_vmm.config import Settings
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.kube import Kube

log = logging.getLogger(__name__)

# How often the controller's certificate is read again from the APIService; at most this often
# too when a client shows another one (it may have just been replaced).
REFRESH_SECONDS = 30.0
RETRY_SECONDS = 2.0
SHUT_OFF = 5  # libvirt's VIR_DOMAIN_SHUTOFF
BIND_RETRY_SECONDS = 1.0


class ControllerCertificate:
    """The controller's certificate, as the APIService's caBundle says now."""

    def __init__(self, read: Callable[[], str | None], trust: tls.GrowingTrust) -> None:
        self.read = read
        self.trust = trust
        self.current: str | None = None
        self._read_at = float("-inf")

    async def refresh(self, at_most_every: float = RETRY_SECONDS) -> None:
        if time.monotonic() - self._read_at < at_most_every:
            return
        self._read_at = time.monotonic()
        try:
            pem = await asyncio.to_thread(self.read)
        except Exception as exc:
            log.warning("cannot read the controller's certificate from its APIService: %s", exc)
            return
        if pem:
            self.trust.add(pem)
        self.current = pem

    async def keep_fresh(self) -> None:
        """Read it every REFRESH_SECONDS; while there is none yet (the controller publishes it
        when it starts, and until then no handshake can succeed), soon again: RETRY_SECONDS,
        doubled each time up to REFRESH_SECONDS (a cluster without the aggregated API costs a
        GET per agent per REFRESH_SECONDS, not a poll)."""
        delay = RETRY_SECONDS
        while True:
            await self.refresh(0.0)
            if self.current:
                delay = RETRY_SECONDS
                await asyncio.sleep(REFRESH_SECONDS)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, REFRESH_SECONDS)

    async def is_peer(self, request: web.Request) -> bool:
        peer = _peer_der(request)
        if self.current and tls.same_certificate(peer, self.current):
            return True
        await self.refresh()  # replaced since we last read it?
        return bool(self.current) and tls.same_certificate(peer, self.current or "")


def _peer_der(request: web.Request) -> bytes | None:
    transport = request.transport
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    return obj.getpeercert(binary_form=True) if obj is not None else None


def routes(
    hypervisor: Hypervisor,
    layout: NodeLayout,
    controller: ControllerCertificate,
    segment_seconds: float,
) -> list[web.RouteDef]:
    async def domain_of(request: web.Request) -> DomainInfo:
        if not await controller.is_peer(request):
            raise web.HTTPForbidden(text="only the controller's certificate is answered here\n")
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        for info in await asyncio.to_thread(hypervisor.owned_domains):
            owner = info.owner
            if owner is not None and (owner.namespace, owner.name) == (namespace, name):
                return info
        raise web.HTTPNotFound(text=f"VM {namespace}/{name} has no domain on this node\n")

    async def console(request: web.Request) -> web.StreamResponse:
        info = await domain_of(request)
        assert info.owner is not None
        return await console_log.serve(request, layout.console_log(info.owner), segment_seconds)

    async def stats(request: web.Request) -> web.Response:
        info = await domain_of(request)
        try:
            every = await asyncio.to_thread(hypervisor.all_domain_stats)
        except HypervisorError as exc:
            raise web.HTTPServiceUnavailable(text=f"libvirt does not answer: {exc}\n") from None
        values = next((v for domain, v in every if domain == info.name), None)
        if values is None or values.get("state.state") == SHUT_OFF:
            raise web.HTTPNotFound(text="the VM is not running: a stopped VM has no counters\n")
        return web.json_response({"at": time.time(), **summary(values)})

    return [
        web.get("/vms/{namespace}/{name}/console", console),
        web.get("/vms/{namespace}/{name}/stats", stats),
    ]


async def listen(site: web.TCPSite) -> None:
    """Start ``site``, waiting while its port is still held: an agent started again at once
    finds its last process's connections closing on it (FIN_WAIT_2 until the controller closes
    its pooled side), which SO_REUSEADDR does not cover."""
    while True:
        try:
            await site.start()
            return
        except OSError as exc:
            await site.stop()  # unregistered from its runner, so that it may start again
            log.warning("cannot listen on %s yet: %s; again in %.0f s", site.name, exc, BIND_RETRY_SECONDS)
            await asyncio.sleep(BIND_RETRY_SECONDS)


def serving(
    settings: Settings, kube: Kube, hypervisor: Hypervisor, layout: NodeLayout, identity: Identity
) -> list[Callable[[], Coroutine[Any, Any, None]]]:
    """The access port's server, as a coroutine to run beside kopf (it also keeps the
    controller's certificate current); none when the port is 0."""
    if not settings.access_port:
        return []
    context = tls.server_context(identity.pair())
    controller = ControllerCertificate(
        lambda: kube.api_service_ca(SUBRESOURCES_API_SERVICE), tls.GrowingTrust(context)
    )

    async def serve() -> None:
        app = web.Application()
        app.add_routes(routes(hypervisor, layout, controller, settings.console_segment_seconds))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await listen(web.TCPSite(runner, settings.api_host, settings.access_port, ssl_context=context))
        try:
            await controller.keep_fresh()
        finally:
            await runner.cleanup()

    return [serve]
