"""Tiers: every test module carries exactly one of the markers pure, host, libvirt, controlplane,
guest (a real distribution booted on TCG: minutes), node (a real kubelet node and `helm
install` of the image built here: minutes). `hack/test -m "not guest and not node"` skips the
slow two locally; CI never does."""

import re
from pathlib import Path

import pytest

TIERS = {"pure", "host", "libvirt", "controlplane", "guest", "node"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tiers = {m.name for m in item.iter_markers()} & TIERS
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid} must carry exactly one tier marker of {sorted(TIERS)}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed test of the shared fleet shows what its processes last complained of: a CI run
    keeps only its output, and a VM left unbound says nothing of why by itself."""
    outcome = yield
    report = outcome.get_result()
    shared = getattr(item, "funcargs", {}).get("fleet")
    if report.when == "call" and report.failed and shared is not None:
        for proc in [shared.controller, *shared.agents.values()]:
            report.sections.append((f"{proc.name}: its last warnings", warnings_of(proc.log)))


def warnings_of(log: Path, lines: int = 25) -> str:
    if not log.exists():
        return "(no log)"
    kept = [line for line in log.read_text(errors="replace").splitlines() if re.match(_WARNING, line)]
    return "\n".join(line[:300] for line in kept[-lines:]) or "(none)"


_WARNING = r"^\S+ \S+ (WARNING|ERROR|CRITICAL) "


# Shared fixtures, by name: the real-QEMU node, the control plane, the fleet.
from tests.support.cluster import control_plane, kubectl, ns  # noqa: E402, F401
from tests.support.fleet import fleet  # noqa: E402, F401
from tests.support.networks import make_network  # noqa: E402, F401
from tests.support.nodes import qemu_node  # noqa: E402, F401
