"""/healthz, /readyz and Prometheus /metrics on VMM_API_PORT, for the controller and the agent.

What each probe checks is what the process's own loops report to ``Health``:

- ``/healthz`` (liveness: restart me if it fails): the HTTP server answers from the event loop,
  and every background loop and worker pool the process registered is still alive. It does not
  depend on the API or libvirt: restarting the process would not bring those back.
- ``/readyz`` (readiness): kopf has started its watches, and each registered pulse beat recently
  (the API answered, a watch delivered what we wrote, ...), and each live check passes now
  (libvirt answers, for the agent).
"""

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

Check = Callable[[], str | None]  # None when fine, else why not


@dataclass
class _Pulse:
    within: float
    what: str
    last: float | None = None


class Health:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pulses: dict[str, _Pulse] = {}
        self._ready_checks: dict[str, Check] = {}
        self._live_checks: dict[str, Check] = {}
        self.started = threading.Event()

    def pulse(self, name: str, within: float, what: str) -> None:
        """Readiness needs ``beat(name)`` at most ``within`` seconds ago; ``what`` says what it
        proves, in the probe's answer."""
        with self._lock:
            self._pulses[name] = _Pulse(within, what)

    def beat(self, name: str) -> None:
        with self._lock:
            if name in self._pulses:
                self._pulses[name].last = self._clock()

    def ready_check(self, name: str, check: Check) -> None:
        self._ready_checks[name] = check

    def live_check(self, name: str, check: Check) -> None:
        self._live_checks[name] = check

    def not_ready(self) -> list[str]:
        problems = [] if self.started.is_set() else ["the operator is starting"]
        now = self._clock()
        with self._lock:
            pulses = list(self._pulses.values())
        for pulse in pulses:
            if pulse.last is None:
                problems.append(f"{pulse.what}: not yet")
            elif now - pulse.last > pulse.within:
                problems.append(f"{pulse.what}: not for {now - pulse.last:.0f}s")
        problems += _run(self._ready_checks)
        return problems

    def not_live(self) -> list[str]:
        return _run(self._live_checks)


def within(seconds: float, check: Check) -> Check:
    """``check``, answered within ``seconds`` or reported as hanging. It runs in a thread of its
    own, so a probe never waits on a hung daemon; and at most one runs at a time, so probes of a
    daemon that stays hung do not pile up threads (nor calls queued on its connection)."""
    lock = threading.Lock()
    running: list[threading.Thread] = []
    started = [0.0]

    def bounded() -> str | None:
        answer: list[str | None] = []
        with lock:
            if running and running[0].is_alive():
                waited = time.monotonic() - started[0]
                return f"no answer for {waited:.0f}s"
            thread = threading.Thread(target=lambda: answer.append(check()), daemon=True)
            running[:] = [thread]
            started[0] = time.monotonic()
            thread.start()
        thread.join(seconds)
        if not answer:
            return f"no answer within {seconds:.0f}s"
        return answer[0]

    return bounded


def _run(checks: dict[str, Check]) -> list[str]:
    problems = []
    for name, check in list(checks.items()):
        try:
            why = check()
        except Exception as exc:  # a check that breaks says so; it never breaks the probe
            why = f"check failed: {exc}"
        if why is not None:
            problems.append(f"{name}: {why}")
    return problems


# Why a caller may not read /metrics (HTTP status, message), or None: the agent's names every
# tenant's VMs, so it asks the apiserver who the caller is (access.py).
MetricsGuard = Callable[[str | None], Awaitable[tuple[int, str] | None]]


def build_app(
    health: Health, extra_routes: list[web.RouteDef] | None = None, metrics_guard: MetricsGuard | None = None
) -> web.Application:
    async def healthz(_: web.Request) -> web.Response:
        problems = health.not_live()
        if problems:
            return web.Response(status=500, text="not live: " + "; ".join(problems) + "\n")
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        # Off the event loop: a check may wait on libvirt.
        problems = await asyncio.to_thread(health.not_ready)
        if problems:
            return web.Response(status=503, text="not ready: " + "; ".join(problems) + "\n")
        return web.Response(text="ok\n")

    async def metrics(request: web.Request) -> web.Response:
        if metrics_guard is not None:
            refused = await metrics_guard(request.headers.get("Authorization"))
            if refused is not None:
                return web.Response(status=refused[0], text=refused[1] + "\n")
        # Off the event loop: the agent's per-VM series ask libvirt (vm_metrics.py).
        body = await asyncio.to_thread(generate_latest, REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)])
    app.add_routes(extra_routes or [])
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
