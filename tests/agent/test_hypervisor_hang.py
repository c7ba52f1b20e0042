"""A libvirtd that hangs (stopped with SIGSTOP, as a daemon stuck on a dead NFS mount would be):
every thread waiting on it gets an error, none is left hanging, and calls work again once it
answers. libvirt's client wakes only one of several calls waiting on one connection when its
keepalive gives up; the Hypervisor gives each thread a connection of its own for that reason,
and this test is what fails if that is undone."""

import os
import signal
import threading

import pytest

from formation_vmm.agent.hypervisor import Hypervisor, HypervisorUnavailableError, start_event_loop
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from tests.support.waiting import wait_for

pytestmark = pytest.mark.libvirt

CALLERS = 3


def test_every_call_waiting_on_a_hung_daemon_fails_and_none_hangs(qemu_node: LibvirtNode) -> None:
    start_event_loop()  # keepalives need libvirt's event loop, as in the agent
    hv = Hypervisor(qemu_node.uri, listener=lambda _name, _event: None)
    try:
        hv.owned_domains()  # every caller below has a connection open before the hang
        outcomes: dict[int, BaseException | None] = {}
        opened = threading.Barrier(CALLERS + 1)
        go = threading.Barrier(CALLERS + 1)

        def caller(index: int) -> None:
            hv.capacity()  # opens this thread's connection while the daemon answers
            opened.wait()
            go.wait()
            try:
                hv.owned_domains()
                outcomes[index] = None
            except BaseException as exc:
                outcomes[index] = exc

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(CALLERS)]
        for thread in threads:
            thread.start()
        opened.wait(30)
        daemon = qemu_node.pid()
        assert daemon is not None
        os.kill(daemon, signal.SIGSTOP)
        try:
            go.wait()
            # The keepalive gives up after about 20s; without a connection per thread, all but
            # one caller would wait here until the daemon answers again.
            wait_for(lambda: len(outcomes) == CALLERS, 60, "every caller to be told the daemon is gone")
        finally:
            os.kill(daemon, signal.SIGCONT)
        assert all(isinstance(exc, HypervisorUnavailableError) for exc in outcomes.values()), outcomes
        assert all("keepalive" in str(exc) for exc in outcomes.values()), outcomes
        assert wait_for(lambda: hv.reachable() is None, 30, "libvirtd to answer again") is True
        hv.owned_domains()  # this thread's connection was reopened
    finally:
        hv.close()
    assert hv.connections() == 0
