"""Probes: the thresholds (probe_state.py, pure) and the prober against real servers on loopback
(the probes' own code path; guests on real networks: tests/controlplane/test_real_network.py)."""

import http.server
import socket
import threading
from collections.abc import Iterator

import pytest

from formation_vmm.agent.plan import Actual, DomainState
from formation_vmm.agent.probes.probe_state import ProbeRecord, readiness_of
from formation_vmm.agent.probes.prober import Prober, ProbeTarget, probe_target
from formation_vmm.agent.state import DomainInfo
from formation_vmm.api.models import InterfaceStatus, Probe
from formation_vmm.api.names import ADDRESSES_ANNOTATION
from tests.support.factories import make_vm
from tests.support.waiting import wait_for


def probe(**kw: object) -> Probe:
    return Probe.model_validate({"periodSeconds": 1, "timeoutSeconds": 1, **kw})


@pytest.mark.pure
def test_readiness_starts_not_ready_and_turns_with_the_thresholds() -> None:
    record = ProbeRecord.of("readiness", probe(tcpSocket={"port": 1}, successThreshold=2, failureThreshold=2))
    assert readiness_of(record, "p").reason == "ReadinessProbePending"
    assert not record.record(True, "ok") and not record.passing  # one success of two
    assert record.record(True, "ok") and record.passing
    assert not record.record(False, "refused") and record.passing  # one failure of two
    assert record.record(False, "refused") and not record.passing
    verdict = readiness_of(record, "readiness probe tcpSocket :1")
    assert (verdict.ready, verdict.ever_ready, verdict.reason) == (False, True, "ReadinessProbeFailed")
    assert verdict.message == "readiness probe tcpSocket :1: refused"


@pytest.mark.pure
def test_liveness_starts_alive_and_fails_after_the_threshold() -> None:
    record = ProbeRecord.of("liveness", probe(tcpSocket={"port": 1}, successThreshold=5, failureThreshold=3))
    assert record.passing and record.success_threshold == 1
    assert not record.record(False, "x") and not record.record(False, "x")
    assert record.record(False, "x") and not record.passing


class _Answer(http.server.BaseHTTPRequestHandler):
    code = 200

    def do_GET(self) -> None:
        self.send_response(_Answer.code if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def prober() -> Iterator[tuple[Prober, list[str]]]:
    changes: list[str] = []
    pings = {"vm-ok": None, "vm-silent": "the guest agent does not answer: not connected"}
    p = Prober(lambda domain, _timeout: pings[domain], changes.append)
    p.start()
    yield p, changes
    p.close()


@pytest.mark.host
def test_an_http_probe_turns_ready_on_2xx_and_not_ready_on_errors(
    prober: tuple[Prober, list[str]], http_server: http.server.HTTPServer
) -> None:
    p, changes = prober
    port = http_server.server_address[1]
    _Answer.code = 200
    p.update(
        "a",
        ProbeTarget(
            "dom-a",
            "run-1",
            "127.0.0.1",
            readiness=probe(httpGet={"port": port, "path": "/healthz"}, failureThreshold=1),
        ),
    )
    ready = wait_for(lambda: (r := p.readiness("a")) is not None and r.ready and r, 10, "ready")
    assert ready.reason == "ReadinessProbeSucceeded" and changes == ["a"]
    _Answer.code = 503
    gone = wait_for(lambda: (r := p.readiness("a")) is not None and not r.ready and r, 10, "not ready")
    assert gone.reason == "ReadinessProbeFailed" and gone.message.endswith("HTTP 503")
    assert gone.ever_ready and changes == ["a", "a"]


@pytest.mark.host
def test_a_tcp_probe_to_a_closed_port_says_why_and_a_new_run_starts_over(
    prober: tuple[Prober, list[str]],
) -> None:
    p, _ = prober
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        p.update(
            "b",
            ProbeTarget(
                "dom-b", "run-1", "127.0.0.1", liveness=probe(tcpSocket={"port": port}, failureThreshold=2)
            ),
        )
        why = wait_for(lambda: p.liveness_failure("b"), 10, "liveness failure")
    assert why.startswith(
        f"liveness probe tcpSocket :{port} failed 2 times: cannot connect to 127.0.0.1:{port}"
    )
    assert "refused" in why.lower()
    p.update(
        "b",
        ProbeTarget(
            "dom-b", "run-2", "127.0.0.1", liveness=probe(tcpSocket={"port": port}, initialDelaySeconds=60)
        ),
    )
    assert p.liveness_failure("b") is None  # the new run has not failed (yet)
    p.update("b", None)
    assert p.liveness_failure("b") is None and p.states() == {}


@pytest.mark.host
def test_guest_agent_ping_and_a_vm_without_an_assigned_address(prober: tuple[Prober, list[str]]) -> None:
    p, _ = prober
    p.update("ok", ProbeTarget("vm-ok", "r", None, readiness=probe(guestAgentPing={})))
    p.update(
        "silent", ProbeTarget("vm-silent", "r", None, readiness=probe(guestAgentPing={}, failureThreshold=1))
    )
    p.update(
        "no-ip", ProbeTarget("vm-x", "r", None, readiness=probe(tcpSocket={"port": 22}, failureThreshold=1))
    )
    wait_for(lambda: (r := p.readiness("ok")) is not None and r.ready, 10, "ping ready")
    silent = wait_for(
        lambda: (r := p.readiness("silent")) is not None and r.reason == "ReadinessProbeFailed" and r, 10, "x"
    )
    assert "the guest agent does not answer" in silent.message
    no_ip = wait_for(
        lambda: (r := p.readiness("no-ip")) is not None and r.reason == "ReadinessProbeFailed" and r, 10, "x"
    )
    assert "no assigned address" in no_ip.message
    assert p.states() == {
        "vm-ok": {"readiness": True},
        "vm-silent": {"readiness": False},
        "vm-x": {"readiness": False},
    }


@pytest.mark.host
def test_guests_that_never_answer_cannot_fail_their_neighbours_pings() -> None:
    """One tenant's guests accept the ping and never answer (the ping below blocks for its whole
    timeout, as libvirt's call does on such a guest: libvirt cannot be made to hang on cue, so
    this stands in for it). With as many of them as the pool has threads, a neighbour's ping
    waits for a thread: that wait must not count as its timeout, and a ping that could not run
    is unknown, so the neighbour's liveness (failureThreshold 1) never fails. Each hung VM
    has at most one ping in flight."""
    lock = threading.Lock()
    calls: dict[str, int] = {}
    in_flight: dict[str, int] = {}
    most: dict[str, int] = {}

    def ping(domain: str, timeout: float) -> str | None:
        with lock:
            calls[domain] = calls.get(domain, 0) + 1
            in_flight[domain] = in_flight.get(domain, 0) + 1
            most[domain] = max(most.get(domain, 0), in_flight[domain])
        try:
            if domain.startswith("hung"):
                threading.Event().wait(timeout)
                return f"the guest agent did not answer within {timeout:.0f}s"
            return None
        finally:
            with lock:
                in_flight[domain] -= 1

    changes: list[str] = []  # every verdict that changed, in order
    p = Prober(ping, changes.append, ping_threads=2)
    p.start()
    try:
        for i in range(2):
            hung = probe(guestAgentPing={}, timeoutSeconds=4, periodSeconds=1)
            p.update(f"hung{i}", ProbeTarget(f"hung{i}", "r", None, liveness=hung))
        neighbour = probe(guestAgentPing={}, timeoutSeconds=1, periodSeconds=1, failureThreshold=1)
        p.update("neighbour", ProbeTarget("neighbour", "r", None, liveness=neighbour))
        # Each hung VM's ping ran twice, holding both threads for 4 s each time, its probe
        # asking every second meanwhile: the neighbour's ping waited for a thread longer than
        # its 1 s timeout, and had failed without the fix.
        wait_for(lambda: all(calls.get(f"hung{i}", 0) >= 2 for i in range(2)), 30, "the hung pings")
        assert "neighbour" not in changes, changes  # its liveness never turned, not even for a while
        assert p.states()["neighbour"] == {"liveness": True}
        assert most["hung0"] == most["hung1"] == 1, most
        # It did run in between, when a thread was free, and passed.
        wait_for(lambda: calls.get("neighbour", 0) >= 1, 30, "the neighbour's ping")
        assert "neighbour" not in changes, changes
    finally:
        p.close()


@pytest.mark.host
def test_hundreds_of_probes_share_one_thread(prober: tuple[Prober, list[str]]) -> None:
    p, _ = prober
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)  # accepts into its backlog
    port = listener.getsockname()[1]
    before = set(threading.enumerate())
    for i in range(300):
        p.update(
            f"vm-{i}", ProbeTarget(f"dom-{i}", "r", "127.0.0.1", readiness=probe(tcpSocket={"port": port}))
        )
    wait_for(
        lambda: all((r := p.readiness(f"vm-{i}")) is not None and r.ready for i in range(300)),
        30,
        "all ready",
    )
    # No thread per probe. Threads of earlier tests may end meanwhile: only new ones count.
    assert set(threading.enumerate()) - before == set()
    listener.close()


@pytest.mark.pure
def test_probes_run_only_while_the_domain_runs_and_target_the_assigned_address() -> None:
    running = DomainInfo(
        name="ns_vm1",
        uuid="u",
        owner=None,
        actual=Actual(DomainState.RUNNING),
        vcpus=1,
        memory_kib=1,
        run_id=7,
    )
    spec = {"networks": [{"name": "eth0"}], "readinessProbe": {"tcpSocket": {"port": 22}}}
    vm = make_vm(**spec)
    vm.metadata.annotations[ADDRESSES_ANNOTATION] = "eth0=default/10.123.0.9"
    target = probe_target(vm, running, stopping=False)
    assert target is not None and (target.address, target.run, target.domain) == ("10.123.0.9", "7", "ns_vm1")
    assert probe_target(vm, running, stopping=True) is None  # a graceful stop under way
    assert probe_target(make_vm(paused=True, **spec), running, stopping=False) is None
    paused = DomainInfo(
        name="ns_vm1", uuid="u", owner=None, actual=Actual(DomainState.PAUSED), vcpus=1, memory_kib=1
    )
    assert probe_target(vm, paused, stopping=False) is None
    assert probe_target(vm, None, stopping=False) is None
    assert probe_target(make_vm(networks=[{"name": "eth0"}]), running, stopping=False) is None  # no probes
    reported = make_vm(**spec)
    reported.status.interfaces = [
        InterfaceStatus(name="eth0", ip_address="127.0.0.1", info_source="guest-agent"),
    ]
    unassigned = probe_target(reported, running, stopping=False)
    assert unassigned is not None and unassigned.address is None  # a guest's own report is never probed
    # Nor a status claiming IPAM's word: only the controller's annotation is the record.
    reported.status.interfaces = [InterfaceStatus(name="eth0", ip_address="127.0.0.1", info_source="ipam")]
    claimed = probe_target(reported, running, stopping=False)
    assert claimed is not None and claimed.address is None
