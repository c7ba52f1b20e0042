"""The Helm chart on its own: lint, and the RBAC it renders is the RBAC of manifests/ (the
install itself is tested against the apiserver in tests/controlplane/test_install.py)."""

from typing import Any

import pytest
import yaml

from tests.support.helm import CHART, ROOT, helm

pytestmark = pytest.mark.host


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
    for name in ("rbac-controller.yaml", "rbac-agent.yaml", "rbac-users.yaml"):
        manifests += yaml.safe_load_all((ROOT / "manifests" / "base" / name).read_text())
    assert rules_by_role(chart) == rules_by_role(manifests)
    assert set(rules_by_role(chart)) == {
        "ClusterRole/controller",
        "ClusterRole/agent",
        "ClusterRole/edit",
        "ClusterRole/view",
        "Role/controller-leader",
    }


def test_chart_and_manifests_ship_the_same_admission_policies() -> None:
    """Rendered as release formation-vmm in namespace formation-vmm, the chart's policies are
    those of manifests/base/policies.yaml, word for word."""
    chart = yaml.safe_load_all(helm("template", "formation-vmm", str(CHART), "-n", "formation-vmm"))
    manifests = yaml.safe_load_all((ROOT / "manifests" / "base" / "policies.yaml").read_text())

    def policies(docs: Any) -> dict[str, Any]:
        return {
            f"{d['kind']}/{d['metadata']['name']}": d.get("spec", d.get("data"))
            for d in docs
            if d
            and (
                d["kind"].startswith("ValidatingAdmissionPolicy") or d["metadata"]["name"].endswith("-limits")
            )
        }

    rendered, shipped = policies(chart), policies(manifests)
    assert set(rendered) == {
        "ValidatingAdmissionPolicy/formation-vmm-agent-node",
        "ValidatingAdmissionPolicyBinding/formation-vmm-agent-node",
        "ValidatingAdmissionPolicy/formation-vmm-placement",
        "ValidatingAdmissionPolicyBinding/formation-vmm-placement",
        "ValidatingAdmissionPolicy/formation-vmm-limits",
        "ValidatingAdmissionPolicyBinding/formation-vmm-limits",
        "ConfigMap/formation-vmm-limits",
    }
    assert rendered == shipped


def test_chart_and_manifests_make_the_same_default_network() -> None:
    def networks(docs: Any) -> dict[str, Any]:
        return {d["metadata"]["name"]: d["spec"] for d in docs if d and d["kind"] == "VmNetwork"}

    chart = networks(yaml.safe_load_all(helm("template", "vmm", str(CHART))))
    shipped = networks(yaml.safe_load_all((ROOT / "manifests" / "base" / "network-default.yaml").read_text()))
    assert chart == shipped == {"default": {"mode": "nat", "subnet": "10.123.0.0/16"}}
    assert "manifests/base/network-default.yaml" in (
        ROOT / "manifests" / "kustomization.yaml"
    ).read_text().replace("  - base/", "manifests/base/")
    off = yaml.safe_load_all(helm("template", "vmm", str(CHART), "--set", "defaultNetwork.enabled=false"))
    assert networks(off) == {}


def test_no_container_runs_privileged_or_keeps_capabilities_it_does_not_use() -> None:
    """Chart and manifests alike: nothing privileged, no privilege escalation, a read-only root
    filesystem, seccomp RuntimeDefault; the agent keeps CHOWN, DAC_OVERRIDE and FOWNER (root
    acting on files libvirt chowned to its qemu user), the controller nothing."""
    chart = list(yaml.safe_load_all(helm("template", "vmm", str(CHART))))
    manifests: list[dict[str, Any]] = []
    for name in ("agent.yaml", "controller.yaml"):
        manifests += yaml.safe_load_all((ROOT / "manifests" / "base" / name).read_text())
    for docs in (chart, manifests):
        workloads = [d for d in docs if d and d.get("kind") in ("DaemonSet", "Deployment")]
        assert {d["kind"] for d in workloads} == {"DaemonSet", "Deployment"}
        for doc in workloads:
            for container in doc["spec"]["template"]["spec"]["containers"]:
                context = container["securityContext"]
                assert not context.get("privileged", False)
                assert context["allowPrivilegeEscalation"] is False
                assert context["readOnlyRootFilesystem"] is True
                assert context["capabilities"]["drop"] == ["ALL"]
                wanted = ["CHOWN", "DAC_OVERRIDE", "FOWNER"] if doc["kind"] == "DaemonSet" else []
                assert sorted(context["capabilities"].get("add", [])) == wanted
                seccomp = context.get("seccompProfile") or doc["spec"]["template"]["spec"].get(
                    "securityContext", {}
                ).get("seccompProfile")
                assert seccomp == {"type": "RuntimeDefault"}, doc["metadata"]["name"]
