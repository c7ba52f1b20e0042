"""A VM's console and counters, behind the apiserver (issue 26, finding 3): `kubectl vm console`
and `kubectl vm top` ask the apiserver for subresources of our aggregated API; the apiserver
authenticates the user (token or client certificate) and authorises them with the RBAC we ship,
then proxies to the controller with its front-proxy certificate; the controller checks again and
asks the VM's agent over mutual TLS. Real plugin, real tokens, the real aggregation layer, the
real agents. No user credential reaches a node: the attack test stands a compromised node's
agent up and looks at what it is sent."""

import asyncio
import base64
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from formation_vmm import tls
from formation_vmm.agent.serving.controller_api import listen
from formation_vmm.api.names import AGENT_ACCESS_ANNOTATION
from formation_vmm.devcluster.cluster import Kubectl
from formation_vmm.devcluster.processes import alive
from tests.support.fleet import TINY, Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

ON_A = {**TINY, "nodeSelector": {"zone": "a"}}
GROUP_PATH = "/apis/subresources.vmm.formation.cloud/v1"


def console_log(fleet: Fleet, ns: str, name: str) -> Path:
    """The test driver runs no guest, so nothing writes the serial log; we write what a guest
    would have (the real-QEMU tier reads a real guest's console the same way)."""
    uid = fleet.vm(ns, name)["metadata"]["uid"]
    return fleet.node_dir("node-a") / "run" / ns / name / uid / "console.log"


def token_of(kubeconfig: Path) -> str:
    return str(yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"])


def get(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def raw(fleet: Fleet, kubeconfig: Path, path: str) -> "subprocess.CompletedProcess[str]":
    """``kubectl get --raw`` as the user of ``kubeconfig``: the apiserver's own client."""
    return Kubectl(fleet.plane.binaries() / "kubectl", kubeconfig).run("get", "--raw", path)


def key_pair(key: Path, cert: Path) -> tls.KeyPair:
    return tls.KeyPair(key.read_bytes(), cert.read_text())


def subresource(ns: str, name: str, sub: str) -> str:
    return f"{GROUP_PATH}/namespaces/{ns}/virtualmachines/{name}/{sub}"


def test_the_owner_reads_the_console_and_others_are_refused(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "talker", **ON_A)
    fleet.wait_phase(ns, "talker", "Running")
    console_log(fleet, ns, "talker").write_text("login: secret-banner\n")
    owner = fleet.user(ns, "owner", "edit")
    viewer = fleet.user(ns, "viewer", "view")
    stranger = fleet.user(f"{ns}-x", "stranger", "edit")

    out = fleet.plugin("-n", ns, "console", "talker", "--no-follow", kubeconfig=owner)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "login: secret-banner\n"
    # A client-certificate user (the admin's kubeconfig): nothing of theirs has to be passed on.
    out = fleet.plugin("-n", ns, "console", "talker", "--no-follow")
    assert out.returncode == 0 and out.stdout == "login: secret-banner\n", out.stderr
    # A viewer may read the VM, not its console: the apiserver refuses, saying so.
    out = fleet.plugin("-n", ns, "console", "talker", "--no-follow", kubeconfig=viewer)
    assert out.returncode != 0 and "secret-banner" not in out.stdout
    assert 'cannot get resource "virtualmachines/console"' in out.stderr
    # A user of another namespace gets nothing, asking the apiserver's path straight either.
    out = raw(fleet, stranger, subresource(ns, "talker", "console"))
    assert out.returncode != 0 and "secret-banner" not in out.stdout
    assert 'cannot get resource "virtualmachines/console" in API group' in out.stderr
    assert f"system:serviceaccount:{ns}-x:stranger" in out.stderr


def test_counters_are_for_readers_of_the_namespace(fleet: Fleet, ns: str) -> None:
    """`kubectl vm top` asks for virtualmachines/stats: view grants it (unlike the console),
    another namespace's user gets nothing."""
    fleet.apply_vm(ns, "counted", **ON_A)
    fleet.wait_phase(ns, "counted", "Running")
    viewer = fleet.user(ns, "viewer", "view")
    out = fleet.plugin("-n", ns, "top", "--interval=0.2", kubeconfig=viewer)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == [
        "NAME",
        "CPU",
        "MEMORY",
        "DISK-READ",
        "DISK-WRITE",
        "NET-RX",
        "NET-TX",
    ]
    assert [line.split()[0] for line in out.stdout.splitlines()[1:]] == ["counted"]
    stranger = fleet.user(f"{ns}-y", "stranger", "edit")
    out = raw(fleet, stranger, subresource(ns, "counted", "stats"))
    assert out.returncode != 0 and 'cannot get resource "virtualmachines/stats"' in out.stderr
    out = raw(fleet, viewer, subresource(ns, "counted", "stats"))
    assert out.returncode == 0, out.stderr
    assert "cpuSeconds" in json.loads(out.stdout)


def test_the_agents_ports_show_no_tenant_data(fleet: Fleet, ns: str) -> None:
    """The public port serves no console; the access port answers nobody but the controller's
    certificate: not an anonymous client, not a certificate of one's own, not another node."""
    fleet.apply_vm(ns, "quiet", **ON_A)
    fleet.wait_phase(ns, "quiet", "Running")
    console_log(fleet, ns, "quiet").write_text("private\n")
    base = fleet.agents["node-a"].url
    owner = token_of(fleet.user(ns, "owner", "edit"))
    for path in (f"/vms/{ns}/quiet/console", f"/namespaces/{ns}/vmstats", "/vms", "/images"):
        status, body = get(base + path, token=owner)
        assert status == 404 and "private" not in body, path
    access = f"https://127.0.0.1:{fleet.agents['node-a'].env['VMM_ACCESS_PORT']}/vms/{ns}/quiet/console"
    published = json.loads(node_annotation(fleet, "node-a", AGENT_ACCESS_ANNOTATION))["certificate"]
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cadata=published)
    anonymous.check_hostname = False
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(access, owner, anonymous)  # no client certificate: no handshake
    stranger = tls.pinned_client(tls.self_signed("formation-vmm-subresources.formation-vmm.svc"), published)
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(access, None, stranger)  # a certificate of one's own, named like the controller's
    # Node b's own key, as a compromised node b holds it, asking node a's agent.
    node_b = fleet.node_dir("node-b") / "agent" / "relay"
    pair_b = key_pair(node_b / "relay-key.pem", node_b / "relay-cert.pem")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        get(access, None, tls.pinned_client(pair_b, published))
    # The node-local debug listener (loopback only) still shows them to whoever is on the node.
    local = fleet.agents["node-a"].debug_url
    assert local is not None and local.startswith("http://127.0.0.1:")
    status, body = get(f"{local}/vms")
    assert status == 200 and '"quiet"' in body


def node_annotation(fleet: Fleet, node: str, key: str) -> str:
    return str(json.loads(fleet.kubectl("get", "node", node, "-o", "json"))["metadata"]["annotations"][key])


def test_the_controller_answers_the_apiserver_only(fleet: Fleet, ns: str) -> None:
    """The controller's aggregated API port, asked directly: a front proxy of one's own (a CA the
    apiserver does not publish) claiming to be the admin gets no handshake; the real front
    proxy's certificate for a user who may not is refused by the controller's own check."""
    fleet.apply_vm(ns, "direct", **ON_A)
    fleet.wait_phase(ns, "direct", "Running")
    console_log(fleet, ns, "direct").write_text("guarded\n")
    port = fleet.controller.env["VMM_SUBRESOURCES_PORT"]
    url = f"https://127.0.0.1:{port}{subresource(ns, 'direct', 'console')}"

    def as_proxy(pair: tls.KeyPair | None, user: str, groups: str = "") -> tuple[int, str]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # we attack; we do not check it
        if pair is not None:
            pair.load_into(ctx)
        headers = {"X-Remote-User": user, **({"X-Remote-Group": groups} if groups else {})}
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=ctx) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        as_proxy(tls.self_signed("front-proxy-client"), "admin", "system:masters")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        as_proxy(None, "admin", "system:masters")
    pki = fleet.plane.pki
    proxy = tls.KeyPair(
        (pki / "front-proxy-client.key").read_bytes(), (pki / "front-proxy-client.crt").read_text()
    )
    status, body = as_proxy(proxy, f"system:serviceaccount:{ns}-x:nobody")
    assert status == 403 and "guarded" not in body, body
    assert "may not get virtualmachines/console" in json.loads(body)["message"]
    # The same certificate for the owner's name: the controller relays (the apiserver would have
    # authorised them first).
    fleet.user(ns, "owner", "edit")
    assert as_proxy(proxy, f"system:serviceaccount:{ns}:owner") == (200, "guarded\n")


class CompromisedAgent:
    """Node a's agent replaced by an attacker who holds the node's key and certificate (as a
    compromised node does): it records every request and the client certificate shown."""

    def __init__(self, fleet: Fleet, controller_certificate: str) -> None:
        self.controller_certificate = controller_certificate
        state = fleet.node_dir("node-a") / "agent" / "relay"
        self.pair = tls.KeyPair(
            (state / "relay-key.pem").read_bytes(), (state / "relay-cert.pem").read_text()
        )
        self.port = int(fleet.agents["node-a"].env["VMM_ACCESS_PORT"])
        self.requests: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _record(self, request: web.Request) -> web.Response:
        obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        self.requests.append(
            {
                "path": request.path_qs,
                "headers": dict(request.headers),
                "client": obj.getpeercert(binary_form=True) if obj is not None else None,
            }
        )
        return web.Response(text="harvested\n")

    async def _start(self) -> web.AppRunner:
        ctx = tls.server_context(self.pair)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # it takes any client it can get
        ctx.load_verify_locations(cadata=self.controller_certificate)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._record)
        runner = web.AppRunner(app)
        await runner.setup()
        # The dead agent's accepted connections may hold the port a while (FIN_WAIT_2).
        await listen(web.TCPSite(runner, "127.0.0.1", self.port, ssl_context=ctx))
        return runner


def test_a_compromised_node_collects_no_users_credentials(fleet: Fleet, ns: str) -> None:
    """The attack of finding 3: an admin follows the console of a VM on a node an attacker owns.
    The attacker's server (in place of node a's agent, with node a's key) gets the controller's
    request, carrying no Authorization header and nothing of the user's token, shown only the
    controller's certificate: nothing it can replay at the apiserver or at another node."""
    fleet.apply_vm(ns, "bait", **ON_A)
    fleet.wait_phase(ns, "bait", "Running")
    admin = fleet.user(ns, "admin-of-ns", "admin")
    token = token_of(admin)
    bundle = fleet.kubectl(
        "get", "apiservice", "v1.subresources.vmm.formation.cloud", "-o", "jsonpath={.spec.caBundle}"
    )
    controller_cert = base64.b64decode(bundle).decode()
    agent = fleet.agents["node-a"]
    attacker = CompromisedAgent(fleet, controller_cert)
    agent.kill()
    wait_for(lambda: not alive(agent.pid), 10, "node a's agent gone")  # its port free again
    runner = None
    try:
        attacker.thread.start()
        runner = asyncio.run_coroutine_threadsafe(attacker._start(), attacker.loop).result(90)
        out = fleet.plugin("-n", ns, "console", "bait", "--no-follow", kubeconfig=admin)
        assert out.stdout == "harvested\n", out.stderr
        assert len(attacker.requests) == 1
        seen = attacker.requests[0]
        assert seen["path"].startswith(f"/vms/{ns}/bait/console")
        assert "Authorization" not in seen["headers"] and "authorization" not in seen["headers"]
        assert token not in json.dumps(seen["headers"]) and token not in seen["path"]
        assert tls.same_certificate(seen["client"], controller_cert)
    finally:
        if runner is not None:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), attacker.loop).result(10)
        attacker.loop.call_soon_threadsafe(attacker.loop.stop)
        agent.restart(fleet.plane)
        agent.wait_ready()


def test_a_console_log_larger_than_any_read_comes_whole(fleet: Fleet, ns: str) -> None:
    """A guest that flooded its serial port: the agent streams the log in bounded chunks off its
    event loop, through the controller and the apiserver, and stays healthy."""
    fleet.apply_vm(ns, "flood", **ON_A)
    fleet.wait_phase(ns, "flood", "Running")
    console_log(fleet, ns, "flood").write_bytes(b"0123456789abcdef" * (4 << 20))  # 64 MiB
    owner = fleet.user(ns, "owner", "edit")
    out = fleet.plugin("-n", ns, "console", "flood", "--no-follow", kubeconfig=owner)
    assert out.returncode == 0 and out.stdout == "0123456789abcdef" * (4 << 20)
    status, _ = get(fleet.agents["node-a"].url + "/healthz")
    assert status == 200
    wait_for(lambda: get(fleet.agents["node-a"].url + "/readyz")[0] == 200, 10, "the agent ready")


def test_a_followed_console_comes_in_segments_the_apiserver_lets_through(fleet: Fleet, ns: str) -> None:
    """The apiserver cuts any request of our API after 60 s. The agent ends a followed console's
    response after VMM_CONSOLE_SEGMENT_SECONDS (2 s here, 45 by default): a follow request
    ends by itself, with what the guest said."""
    fleet.apply_vm(ns, "segments", **ON_A)
    fleet.wait_phase(ns, "segments", "Running")
    console_log(fleet, ns, "segments").write_text("one\n")
    owner = fleet.user(ns, "owner", "edit")
    out = raw(fleet, owner, subresource(ns, "segments", "console") + "?follow=true&offset=1")
    assert (out.returncode, out.stdout) == (0, "ne\n"), out.stderr


def test_following_a_quiet_console_goes_on_where_it_was(fleet: Fleet, ns: str) -> None:
    """A guest silent for longer than the plugin's read timeout (1 s here, 30 by default) and
    than a segment: the plugin asks again from the byte it reached, so following neither ends
    nor prints anything twice."""
    fleet.apply_vm(ns, "hush", **ON_A)
    fleet.wait_phase(ns, "hush", "Running")
    log = console_log(fleet, ns, "hush")
    log.write_text("before the silence\n")
    owner = fleet.user(ns, "owner", "edit")
    argv = [sys.executable, "-m", "formation_vmm.plugin", f"--kubeconfig={owner}", "-n", ns]
    follower = subprocess.Popen(
        [*argv, "console", "hush", "--idle-reconnect", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    got = bytearray()

    def read() -> None:
        assert follower.stdout is not None
        while chunk := follower.stdout.read1(4096):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_for(lambda: bytes(got) == b"before the silence\n", 30, "the console's first line")
        time.sleep(5)  # the guest says nothing for two segments and five read timeouts
        with log.open("a") as f:
            f.write("after it\n")
        wait_for(lambda: b"after it" in got, 30, "the line printed after the silence")
        assert bytes(got) == b"before the silence\nafter it\n"
        assert follower.poll() is None, follower.stderr.read().decode()  # type: ignore[union-attr]
    finally:
        follower.terminate()
        follower.wait(10)
        reader.join(10)


def test_an_offset_that_is_no_number_is_refused(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "counted-bytes", **ON_A)
    fleet.wait_phase(ns, "counted-bytes", "Running")
    console_log(fleet, ns, "counted-bytes").write_text("0123456789\n")
    owner = fleet.user(ns, "owner", "edit")
    path = subresource(ns, "counted-bytes", "console") + "?follow=false"
    out = raw(fleet, owner, f"{path}&offset=4")
    assert (out.returncode, out.stdout) == (0, "456789\n"), out.stderr
    out = raw(fleet, owner, f"{path}&offset=-1")
    assert out.returncode != 0 and "offset must be a number of bytes" in out.stderr


def reviews(fleet: Fleet) -> float:
    """SubjectAccessReviews the apiserver has answered so far (its own counter)."""
    total = 0.0
    for line in fleet.kubectl("get", "--raw", "/metrics").splitlines():
        if line.startswith("apiserver_request_total{") and 'resource="subjectaccessreviews"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_many_console_requests_cost_the_apiserver_one_review(fleet: Fleet, ns: str) -> None:
    """The controller's own check is cached: thirty requests of one user for one console are
    one SubjectAccessReview. (Refusals cost it nothing: the apiserver refuses them before.)"""
    fleet.apply_vm(ns, "guarded", **ON_A)
    fleet.wait_phase(ns, "guarded", "Running")
    console_log(fleet, ns, "guarded").write_text("x\n")
    owner = fleet.user(ns, "owner", "edit")
    path = subresource(ns, "guarded", "console") + "?follow=false"
    before = reviews(fleet)
    for _ in range(30):
        out = raw(fleet, owner, path)
        assert (out.returncode, out.stdout) == (0, "x\n"), out.stderr
    assert reviews(fleet) - before == 1


def test_the_agents_metrics_answer_prometheus_only(fleet: Fleet, ns: str) -> None:
    """/metrics names every tenant's VMs (issue 26, finding 13): the agent asks the apiserver
    whether the caller may get /metrics (a SubjectAccessReview, as kube-rbac-proxy does), which
    the ClusterRole formation-vmm-metrics-reader grants and no tenant role does."""
    fleet.apply_vm(ns, "counted-here", **ON_A)
    fleet.wait_phase(ns, "counted-here", "Running")
    url = f"{fleet.agents['node-a'].url}/metrics"
    status, body = get(url)
    assert status == 401 and "counted-here" not in body
    status, body = get(url, token_of(fleet.user(ns, "admin-of-ns", "admin")))
    assert status == 403 and "may not get /metrics" in body and "counted-here" not in body
    scraped = fleet.scrape(fleet.agents["node-a"])
    assert 'vmm_agent_actions_total{action="start"}' in scraped


def test_consoles_come_back_after_the_apiserver_restarts(fleet: Fleet, ns: str) -> None:
    """The controller's aggregated API and the agents' access ports outlive an apiserver that
    went away: each keeps serving, and asks the API again when it is back (a failed refresh of
    the APIService once ended the controller's server, silently)."""
    fleet.apply_vm(ns, "steady", **ON_A)
    fleet.wait_phase(ns, "steady", "Running")
    console_log(fleet, ns, "steady").write_text("still here\n")
    owner = fleet.user(ns, "owner", "edit")
    # Away longer than the controller's and the agents' refresh periods (10 s and 2-30 s).
    fleet.restart_apiserver(down_seconds=12)
    wait_for(
        lambda: (
            fleet.plugin("-n", ns, "console", "steady", "--no-follow", kubeconfig=owner).stdout
            == "still here\n"
        ),
        60,
        "the console through the restarted apiserver",
    )
    assert "servers" not in get(fleet.controller.url + "/healthz")[1]
