"""The Helm chart on its own: lint, and the RBAC it renders is the RBAC of manifests/ (the
install itself is tested against the apiserver in tests/controlplane/test_install.py)."""

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.binaries import binaries

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "formation-vmm"


def helm(*args: str) -> str:
    proc = subprocess.run([str(binaries() / "helm"), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def rules_by_role(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Role and ClusterRole rules keyed by kind and role (controller, agent, controller-leader),
    whatever the name prefix."""
    found = {}
    for doc in docs:
        if doc and doc.get("kind") in ("ClusterRole", "Role"):
            name = doc["metadata"]["name"].removeprefix("formation-vmm-").removeprefix("vmm-")
            found[f"{doc['kind']}/{name}"] = doc["rules"]
    return found


def test_helm_lint() -> None:
    assert "0 chart(s) failed" in helm("lint", str(CHART))


def test_chart_and_manifests_grant_the_same_rbac() -> None:
    chart = list(yaml.safe_load_all(helm("template", "vmm", str(CHART))))
    manifests: list[dict[str, Any]] = []
    for name in ("rbac-controller.yaml", "rbac-agent.yaml"):
        manifests += yaml.safe_load_all((ROOT / "manifests" / "base" / name).read_text())
    assert rules_by_role(chart) == rules_by_role(manifests)
    assert set(rules_by_role(chart)) == {
        "ClusterRole/controller",
        "ClusterRole/agent",
        "Role/controller-leader",
    }
