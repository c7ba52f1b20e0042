"""The agent's access server starts on a port still held (a restarted agent's last process's
connections, closing): it waits and listens once the port is free. Real sockets on loopback."""

import asyncio
import socket

import pytest
from aiohttp import web

from formation_vmm.agent.serving import controller_api

pytestmark = pytest.mark.host


def test_listen_waits_for_a_held_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(controller_api, "BIND_RETRY_SECONDS", 0.1)

    async def scenario() -> None:
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        runner = web.AppRunner(web.Application())
        await runner.setup()
        task = asyncio.create_task(controller_api.listen(web.TCPSite(runner, "127.0.0.1", port)))
        try:
            await asyncio.sleep(0.5)
            assert not task.done()  # still waiting: the port is held
            holder.close()
            await asyncio.wait_for(task, 5)
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass  # it listens now
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
