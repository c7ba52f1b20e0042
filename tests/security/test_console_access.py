"""A VM's console, through its node's agent, only for a caller allowed to read it: the real
plugin with real tokens, the RBAC we ship aggregated into Kubernetes' own roles, the agent's
TokenReview and SubjectAccessReview against the real apiserver. The tenant-data endpoints of the
replaced service answer on the node's loopback only, never on the agent's public port."""

import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.fleet import TINY, Fleet
from tests.support.waiting import wait_for

pytestmark = pytest.mark.controlplane

ON_A = {**TINY, "nodeSelector": {"zone": "a"}}


def console_log(fleet: Fleet, ns: str, name: str) -> Path:
    """The test driver runs no guest, so nothing writes the serial log; we write what a guest
    would have (the real-QEMU tier reads a real guest's console the same way)."""
    uid = fleet.vm(ns, name)["metadata"]["uid"]
    return fleet.node_dir("node-a") / "run" / ns / name / uid / "console.log"


def token_of(kubeconfig: Path) -> str:
    return str(yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"])


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


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
    # A viewer may read the VM, not its console: the agent refuses, saying so.
    out = fleet.plugin("-n", ns, "console", "talker", "--no-follow", kubeconfig=viewer)
    assert out.returncode != 0 and "secret-banner" not in out.stdout
    assert f'may not get virtualmachines/console of "talker" in namespace "{ns}"' in out.stderr
    # A user of another namespace cannot even read the VM; asking the agent directly with
    # their valid token gets them nothing either.
    out = fleet.plugin("-n", ns, "console", "talker", "--no-follow", kubeconfig=stranger)
    assert out.returncode != 0 and "secret-banner" not in out.stdout
    url = f"{fleet.agents['node-a'].url}/vms/{ns}/talker/console?follow=false"
    status, body = get(url, token=token_of(stranger))
    assert status == 403 and "secret-banner" not in body
    assert f"system:serviceaccount:{ns}-x:stranger may not get virtualmachines/console" in body
    assert get(url, token=token_of(owner)) == (200, "login: secret-banner\n")


def test_counters_are_for_readers_of_the_namespace(fleet: Fleet, ns: str) -> None:
    """`kubectl vm top` asks the agent for virtualmachines/stats: view grants it (unlike the
    console), another namespace's user gets nothing."""
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
    url = f"{fleet.agents['node-a'].url}/namespaces/{ns}/vmstats"
    status, body = get(url, token=token_of(stranger))
    assert status == 403 and "counted" not in body
    assert f'may not get virtualmachines/stats of VMs in namespace "{ns}"' in body
    status, body = get(url, token=token_of(viewer))
    assert status == 200 and '"counted"' in body


def test_the_agents_public_port_shows_no_tenant_data_without_a_token(fleet: Fleet, ns: str) -> None:
    fleet.apply_vm(ns, "quiet", **ON_A)
    fleet.wait_phase(ns, "quiet", "Running")
    console_log(fleet, ns, "quiet").write_text("private\n")
    base = fleet.agents["node-a"].url
    status, body = get(f"{base}/vms/{ns}/quiet/console?follow=false")
    assert status == 401 and "bearer token is required" in body
    status, body = get(f"{base}/vms/{ns}/quiet/console?follow=false", token="not-a-token")
    assert status == 401 and "private" not in body
    for path in ("/vms", "/images", f"/vms/{fleet.vm(ns, 'quiet')['metadata']['uid']}/console"):
        status, body = get(base + path)
        assert status == 404 and "private" not in body, path
    # The node-local debug listener (loopback only) still shows them to whoever is on the node.
    local = fleet.agents["node-a"].debug_url
    assert local is not None and local.startswith("http://127.0.0.1:")
    status, body = get(f"{local}/vms")
    assert status == 200 and '"quiet"' in body


def test_a_console_log_larger_than_any_read_comes_whole(fleet: Fleet, ns: str) -> None:
    """A guest that flooded its serial port: the agent streams the log in bounded chunks off its
    event loop, and stays healthy."""
    fleet.apply_vm(ns, "flood", **ON_A)
    fleet.wait_phase(ns, "flood", "Running")
    console_log(fleet, ns, "flood").write_bytes(b"0123456789abcdef" * (4 << 20))  # 64 MiB
    owner = fleet.user(ns, "owner", "edit")
    out = fleet.plugin("-n", ns, "console", "flood", "--no-follow", kubeconfig=owner)
    assert out.returncode == 0 and out.stdout == "0123456789abcdef" * (4 << 20)
    status, _ = get(fleet.agents["node-a"].url + "/healthz")
    assert status == 200
    wait_for(lambda: get(fleet.agents["node-a"].url + "/readyz")[0] == 200, 10, "the agent ready")


def test_following_a_quiet_console_goes_on_where_it_was(fleet: Fleet, ns: str) -> None:
    """A guest silent for longer than the plugin's read timeout (1 s here, 30 by default): the
    plugin asks the agent again from the byte it reached, so following neither ends nor prints
    anything twice. It used to end with "broke off: timed out"."""
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
        time.sleep(3.5)  # the guest says nothing for three of the plugin's read timeouts
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
    token = token_of(fleet.user(ns, "owner", "edit"))
    url = f"{fleet.agents['node-a'].url}/vms/{ns}/counted-bytes/console?follow=false"
    assert get(f"{url}&offset=4", token) == (200, "456789\n")
    status, body = get(f"{url}&offset=-1", token)
    assert status == 400 and "offset must be a number of bytes" in body


def reviews(fleet: Fleet) -> dict[str, float]:
    """TokenReviews and SubjectAccessReviews the apiserver has answered so far (its own counter:
    only the agents' access checks make them in this cluster)."""
    counts = {"tokenreviews": 0.0, "subjectaccessreviews": 0.0}
    for line in fleet.kubectl("get", "--raw", "/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        for resource in counts:
            if f'resource="{resource}"' in line:
                counts[resource] += float(line.rsplit(" ", 1)[1])
    return counts


def test_a_flood_of_refused_requests_costs_the_apiserver_one_review(fleet: Fleet, ns: str) -> None:
    """Each request to the public port used to be a TokenReview (and a SubjectAccessReview),
    denials never cached: anyone reaching the port could make the agent hammer the apiserver.
    Denials are cached now, as grants are."""
    fleet.apply_vm(ns, "guarded", **ON_A)
    fleet.wait_phase(ns, "guarded", "Running")
    url = f"{fleet.agents['node-a'].url}/vms/{ns}/guarded/console?follow=false"
    stranger = token_of(fleet.user(f"{ns}-x", "stranger", "edit"))
    before = reviews(fleet)
    for _ in range(30):
        assert get(url, "not-a-token")[0] == 401
        status, body = get(url, stranger)
        assert status == 403 and "may not get virtualmachines/console" in body
    after = reviews(fleet)
    # One TokenReview per token, one SubjectAccessReview for the stranger: 60 requests, 3 reviews.
    assert after["tokenreviews"] - before["tokenreviews"] == 2, (before, after)
    assert after["subjectaccessreviews"] - before["subjectaccessreviews"] == 1, (before, after)


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
