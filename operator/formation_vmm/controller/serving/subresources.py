"""The aggregated API the controller serves behind the apiserver (``subresources.vmm.formation.cloud``,
registered by an APIService, as KubeVirt's virt-api serves ``subresources.kubevirt.io``):

- ``GET .../namespaces/{ns}/virtualmachines/{name}/console?follow=&offset=``: the VM's serial
  console log, from its node's agent (``kubectl vm console``);
- ``GET .../namespaces/{ns}/virtualmachines/{name}/stats``: its counters (``kubectl vm top``).

A user's request goes to the apiserver with the user's own credentials; the apiserver
authenticates and authorises it (``get`` on ``virtualmachines/console`` or ``/stats`` of our
subresources group) and proxies it here with its front-proxy certificate and the user's name in
headers (front_proxy.py). We check again (a SubjectAccessReview, access.py) and relay the agent's
answer (agent_links.py). Users' credentials end at the apiserver; agents see only the controller.

A followed console is served in segments shorter than the apiserver's request timeout (60 s for
all but its own long-running verbs): the agent ends each, and ``kubectl vm console`` asks again
from the byte it got to."""

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from formation_vmm import tls
from formation_vmm.access import Ask, Denied, UserAccess
from formation_vmm.api.names import SUBRESOURCES_GROUP, SUBRESOURCES_VERSION, VM_PLURAL
from formation_vmm.controller.serving import serving_certificate
from formation_vmm.controller.serving.agent_links import AgentLinks, Unreachable
from formation_vmm.controller.serving.front_proxy import (
    AUTHENTICATION_CONFIG_MAP,
    AUTHENTICATION_NAMESPACE,
    FrontProxy,
)
from formation_vmm.kube import Body, Kube

log = logging.getLogger(__name__)

GROUP_VERSION = f"{SUBRESOURCES_GROUP}/{SUBRESOURCES_VERSION}"
PREFIX = f"/apis/{GROUP_VERSION}"
SUBRESOURCES = {"console": ("get",), "stats": ("get",)}
CONNECT_SECONDS = 10.0
RETRY_SECONDS = 10.0
# Counters come at once; a console's segment takes as long as the agent keeps it open.
STATS_SECONDS = 30.0
REASONS = {401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 409: "Conflict", 429: "TooManyRequests"}


def status(code: int, message: str) -> web.Response:
    """An error as the apiserver's own: a Status object, whose message kubectl prints."""
    body = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": REASONS.get(code, "ServiceUnavailable" if code == 503 else "InternalError"),
        "code": code,
    }
    return web.json_response(body, status=code)


def resource_list() -> Body:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": GROUP_VERSION,
        "resources": [
            {"name": f"{VM_PLURAL}/{sub}", "namespaced": True, "kind": "", "verbs": list(verbs)}
            for sub, verbs in SUBRESOURCES.items()
        ],
    }


def group() -> Body:
    version = {"groupVersion": GROUP_VERSION, "version": SUBRESOURCES_VERSION}
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": SUBRESOURCES_GROUP,
        "versions": [version],
        "preferredVersion": version,
    }


def _peer_der(request: web.Request) -> bytes | None:
    transport = request.transport
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    return obj.getpeercert(binary_form=True) if obj is not None else None


def routes(
    front: FrontProxy, access: UserAccess, links: AgentLinks, session: Callable[[], aiohttp.ClientSession]
) -> list[web.RouteDef]:
    async def discovery(_: web.Request) -> web.Response:
        return web.json_response(resource_list())

    async def group_(_: web.Request) -> web.Response:
        return web.json_response(group())

    async def groups(_: web.Request) -> web.Response:
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group()]})

    def relayed(subresource: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            namespace, name = request.match_info["namespace"], request.match_info["name"]
            user = front.user(_peer_der(request), request.headers)
            if user is None:
                return status(401, "only the apiserver's front proxy is answered here")
            try:
                await access.check(user, Ask(namespace, name, subresource))
                link = await asyncio.to_thread(links.of_vm, namespace, name)
            except (Denied, Unreachable) as refused:
                return status(refused.status, refused.message)
            query = {k: v for k, v in request.query.items() if k in ("follow", "offset")}
            timeout = aiohttp.ClientTimeout(
                sock_connect=CONNECT_SECONDS, total=STATS_SECONDS if subresource == "stats" else None
            )
            url = f"{link.url}/vms/{namespace}/{name}/{subresource}"
            try:
                async with session().get(url, params=query, ssl=link.context, timeout=timeout) as upstream:
                    if upstream.status != 200:
                        text = (await upstream.content.read(4096)).decode(errors="replace").strip()
                        return status(upstream.status, f"the agent of the VM's node says: {text}")
                    return await _relay(request, upstream)
            except (aiohttp.ClientError, TimeoutError) as exc:
                return status(503, f"cannot reach the agent of the VM's node: {exc or type(exc).__name__}")

        return handler

    base = f"{PREFIX}/namespaces/{{namespace}}/{VM_PLURAL}/{{name}}"
    return [
        web.get("/apis", groups),
        web.get(f"/apis/{SUBRESOURCES_GROUP}", group_),
        web.get(PREFIX, discovery),
        *(web.get(f"{base}/{sub}", relayed(sub)) for sub in SUBRESOURCES),
    ]


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": upstream.headers.get("Content-Type", "application/octet-stream")}
    )
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
    except (aiohttp.ClientError, ConnectionError) as exc:
        log.info("a relayed %s broke off: %s", request.path, exc)
    return response


async def run(kube: Kube, namespace: str, host: str, port: int) -> None:
    """Serve on ``host:port`` once the certificate can be had (the API may be away at start),
    and keep the APIService's caBundle and the front proxy's settings current."""
    while True:
        try:
            pair = await asyncio.to_thread(serving_certificate.load_or_create, kube, namespace)
            break
        except Exception as exc:
            log.warning("cannot get the aggregated API's certificate yet: %s", exc)
            await asyncio.sleep(RETRY_SECONDS)
    context = tls.server_context(pair)
    trust = tls.GrowingTrust(context)
    front = FrontProxy(
        lambda: kube.config_map(AUTHENTICATION_NAMESPACE, AUTHENTICATION_CONFIG_MAP), trust.add
    )
    await asyncio.to_thread(front.refresh)
    session = aiohttp.ClientSession()
    app = web.Application()
    app.add_routes(routes(front, UserAccess(kube), AgentLinks(kube, pair), lambda: session))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, ssl_context=context).start()
    log.info("serving %s on %s:%d", GROUP_VERSION, host, port)
    try:
        while True:
            try:
                await asyncio.to_thread(serving_certificate.publish, kube, pair)
                await asyncio.to_thread(front.refresh)
            except Exception as exc:
                log.warning("cannot update the APIService or read the front proxy's settings now: %s", exc)
            await asyncio.sleep(RETRY_SECONDS)
    finally:
        await session.close()
        await runner.cleanup()
