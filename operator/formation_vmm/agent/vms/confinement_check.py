"""The agent's refusal to run QEMU unconfined (confinement.py decides), at start: loudly. A
libvirtd not reachable yet is no reason to stop: the agent waits for it as for any outage, and
checks as soon as it answers (the chart's libvirtd pod often starts after the agent's)."""

import logging
import os
import signal
import threading

from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.vms.confinement import confinement_problem

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0
UNCONFINED_HINT = "VMM_ALLOW_UNCONFINED_QEMU=true allows it, for development only"


def check(hypervisor: Hypervisor, allowed: bool) -> None:
    """Stop the agent (SystemExit) when QEMU would run unconfined and that is not allowed."""
    try:
        problem = confinement_problem(hypervisor.capabilities())
    except HypervisorError as exc:
        log.warning("cannot check how libvirt confines QEMU yet: %s; checking once it answers", exc)
        threading.Thread(target=_later, args=(hypervisor, allowed), name="confinement", daemon=True).start()
        return
    if problem is None:
        return
    if not allowed:
        raise SystemExit(f"{problem} ({UNCONFINED_HINT})")
    log.warning("%s; allowed by VMM_ALLOW_UNCONFINED_QEMU", problem)


def _later(hypervisor: Hypervisor, allowed: bool) -> None:
    """The check above, once libvirt answers; a refusal stops the agent as SIGTERM does."""
    while True:
        try:
            problem = confinement_problem(hypervisor.capabilities())
            break
        except HypervisorError:
            threading.Event().wait(RETRY_SECONDS)
    if problem is None:
        log.info("libvirt confines QEMU")
    elif allowed:
        log.warning("%s; allowed by VMM_ALLOW_UNCONFINED_QEMU", problem)
    else:
        log.error("%s (%s); stopping", problem, UNCONFINED_HINT)
        os.kill(os.getpid(), signal.SIGTERM)
