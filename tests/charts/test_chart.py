"""The Helm chart on its own: lint, and the RBAC it renders is the RBAC of manifests/ (the
install itself is tested against the apiserver in tests/controlplane/test_install.py)."""

import json
import subprocess
from typing import Any

import pytest
import yaml

from tests.support.binaries import binaries
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


def test_helm_lint_strict() -> None:
    assert "0 chart(s) failed" in helm("lint", "--strict", str(CHART))


def undescribed(values: dict[str, Any], schema: dict[str, Any], path: str = "") -> list[str]:
    """The paths of values.yaml that the schema does not describe, descending where the schema
    describes keys one by one (free-form maps such as nodeSelector are values themselves)."""
    missing = []
    for key, value in values.items():
        child = schema.get("properties", {}).get(key)
        if child is None:
            missing.append(f"{path}/{key}")
        elif isinstance(value, dict) and "properties" in child:
            missing += undescribed(value, child, f"{path}/{key}")
    return missing


def test_the_schema_describes_every_value_and_refuses_unknown_keys() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert undescribed(values, schema) == []

    def closed(node: dict[str, Any], path: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '/'} accepts unknown keys"
            for key, child in node["properties"].items():
                assert child.get("description") or "properties" in child, f"{path}/{key} has no description"
                closed(child, f"{path}/{key}")

    closed(schema, "")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("agent.libvirtURI=qemu:///system", "additional properties 'libvirtURI' not allowed"),
        ("apiPort=web", "at '/apiPort': got string, want integer"),
        ("logLevel=LOUD", "at '/logLevel': value must be one of"),
        ("agent.vmDir=run/vms", "at '/agent/vmDir'"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy'"),
        ("controller.replicas=0", "at '/controller/replicas'"),
        ("defaultNetwork.subnet=10.0.0.0", "at '/defaultNetwork/subnet'"),
    ],
)
def test_a_wrong_value_fails_with_a_message_naming_it(setting: str, message: str) -> None:
    proc = subprocess.run(
        [str(binaries() / "helm"), "template", "vmm", str(CHART), "--set", setting],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def pod_specs(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The workloads, budgets and network policies, without names, labels and selectors (the
    chart's carry the release; the manifests' are fixed)."""
    found: dict[str, Any] = {}
    for doc in docs:
        if not doc or doc["kind"] not in ("Deployment", "DaemonSet", "PodDisruptionBudget", "NetworkPolicy"):
            continue
        spec = json.loads(json.dumps(doc["spec"]))
        spec.pop("selector", None)
        spec.pop("podSelector", None)
        template = spec.get("template", {})
        template.pop("metadata", None)
        for container in template.get("spec", {}).get("containers", []):
            container.pop("imagePullPolicy", None)  # the chart's is a value; the manifests use the default
            for env in container.get("env", []):
                if "value" in env:
                    env["value"] = str(env["value"])
        found[f"{doc['kind']}/{doc['metadata']['name'].removeprefix('formation-vmm-')}"] = spec
    return found


def test_chart_and_manifests_run_the_same_workloads() -> None:
    """Rendered with its defaults as release formation-vmm, the chart's Deployment, DaemonSet,
    PodDisruptionBudget and NetworkPolicies are those of manifests/base, field by field."""
    chart = list(yaml.safe_load_all(helm("template", "formation-vmm", str(CHART), "-n", "formation-vmm")))
    manifests: list[dict[str, Any]] = []
    for path in sorted((ROOT / "manifests" / "base").glob("*.yaml")):
        manifests += yaml.safe_load_all(path.read_text())
    rendered, shipped = pod_specs(chart), pod_specs(manifests)
    assert set(rendered) == {
        "Deployment/controller",
        "DaemonSet/agent",
        "PodDisruptionBudget/controller",
        "NetworkPolicy/controller",
    }
    assert rendered == shipped


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
        "ClusterRole/metrics-reader",
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
        "ValidatingAdmissionPolicy/formation-vmm-networks",
        "ValidatingAdmissionPolicyBinding/formation-vmm-networks",
        "ValidatingAdmissionPolicy/formation-vmm-status",
        "ValidatingAdmissionPolicyBinding/formation-vmm-status",
        "ValidatingAdmissionPolicy/formation-vmm-prefetch",
        "ValidatingAdmissionPolicyBinding/formation-vmm-prefetch",
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
