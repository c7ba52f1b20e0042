"""The replaced service's start-up gate: ``WAIT_FOR=host:port,...`` holds a process until each
target accepts a TCP connection, with one deadline for all of them."""

import logging
import socket
import time

log = logging.getLogger(__name__)


class WaitTimeoutError(RuntimeError):
    pass


def wait_for(targets: list[str], timeout: float, poll: float = 0.5) -> None:
    """Return once every ``host:port`` in ``targets`` accepts a connection; raise
    WaitTimeoutError naming the first that did not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for target in targets:
        host, _, port = target.rpartition(":")
        started = time.monotonic()
        log.info("WAIT_FOR: waiting for %s", target)
        while True:
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=poll):
                    break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise WaitTimeoutError(
                        f"WAIT_FOR: {target} did not answer within {timeout:.0f}s ({exc})"
                    ) from exc
                time.sleep(poll)
        log.info("WAIT_FOR: %s answers (after %.1fs)", target, time.monotonic() - started)
