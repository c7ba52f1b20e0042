"""Installing the product: `helm install` from charts/ and `kubectl apply -k manifests/`, both
against the real apiserver (lint and rendering alone: tests/charts)."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from formation_vmm.api.names import SUBRESOURCES_API_SERVICE
from formation_vmm.devcluster.cluster import Kubectl, route_subresources
from formation_vmm.devcluster.controlplane import ControlPlane, find_binaries
from tests.support.cluster import private_plane
from tests.support.prometheus_crds import crd_files

pytestmark = pytest.mark.controlplane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "formation-vmm"


def helm(plane: ControlPlane, *args: str) -> str:
    proc = subprocess.run(
        [str(find_binaries() / "helm"), f"--kubeconfig={plane.kubeconfig}", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_helm_install_creates_everything(control_plane: ControlPlane, kubectl: Kubectl) -> None:
    helm(
        control_plane,
        "install",
        "vmm-helm",
        str(CHART),
        "-n",
        "vmm-helm",
        "--create-namespace",
        "--wait=false",
        # This cluster has the default VmNetwork already (the fleet's install made it; Helm will
        # not adopt an object it did not make). The chart renders it: tests/charts/test_chart.py.
        "--set",
        "defaultNetwork.enabled=false",
        # Nor its APIService, which the fleet routes to its own controller.
        "--set",
        "aggregatedApi.enabled=false",
    )
    try:
        status = json.loads(helm(control_plane, "status", "vmm-helm", "-n", "vmm-helm", "-o", "json"))
        assert status["info"]["status"] == "deployed"
        kubectl("get", "deployment/vmm-helm-controller", "daemonset/vmm-helm-agent", "-n", "vmm-helm")
        kubectl("get", "clusterrole/vmm-helm-controller", "clusterrole/vmm-helm-agent")
        ds = json.loads(kubectl("get", "daemonset/vmm-helm-agent", "-n", "vmm-helm", "-o", "json"))
        assert ds["spec"]["template"]["spec"]["nodeSelector"] == {"vmm.formation.cloud/hypervisor": "true"}
        kubectl(
            "get",
            "crd",
            "virtualmachines.vmm.formation.cloud",
            "vmimages.vmm.formation.cloud",
            "vmnetworks.vmm.formation.cloud",
        )
    finally:
        helm(control_plane, "uninstall", "vmm-helm", "-n", "vmm-helm")


def test_kustomize_manifests_apply(kubectl: Kubectl) -> None:
    # The fleet's controller serves the aggregated API from this machine: the manifests' APIService
    # (to a Service of the controller's pods, which never run here) is routed back after.
    routed = kubectl(
        "get", "apiservice", SUBRESOURCES_API_SERVICE, "-o", "jsonpath={.spec.service.port}", check=False
    )
    try:
        # Server-side, as the CRDs were installed that way by the session fixture.
        kubectl("apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "manifests"))
        kubectl(
            "get",
            "deployment/formation-vmm-controller",
            "daemonset/formation-vmm-agent",
            "-n",
            "formation-vmm",
        )
        kubectl(
            "get", "clusterrolebinding/formation-vmm-controller", "clusterrolebinding/formation-vmm-agent"
        )
        kubectl(
            "get",
            f"apiservice/{SUBRESOURCES_API_SERVICE}",
            "service/formation-vmm-subresources",
            "-n",
            "formation-vmm",
        )
    finally:
        if routed.isdecimal():
            route_subresources(kubectl, int(routed))


ALL_FEATURES = (
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "monitoring.dashboard.enabled=true",
    "agent.tolerations[0].key=vmm.formation.cloud/drain",
    "agent.tolerations[0].operator=Exists",
    "libvirtd.enabled=true",
)


@pytest.mark.parametrize("features", [(), ALL_FEATURES], ids=["defaults", "every-feature-on"])
def test_the_rendered_chart_passes_a_strict_server_side_dry_run(
    control_plane: ControlPlane, kubectl: Kubectl, features: tuple[str, ...]
) -> None:
    """The apiserver knows every built-in schema: a server-side dry run with strict field
    validation refuses an unknown or misplaced field in anything the chart renders. The
    monitoring objects are checked against the Prometheus Operator's own CRDs."""
    for crd in crd_files():
        kubectl("apply", "--server-side", "-f", str(crd))
    kubectl("create", "namespace", "vmm-dry-run", check=False)
    sets = [arg for feature in features for arg in ("--set", feature)]
    peers = '[{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]'
    if features:
        sets += ["--set-json", f"networkPolicy.controllerFrom={peers}"]
    rendered = helm(control_plane, "template", "vmm-dry-run", str(CHART), "-n", "vmm-dry-run", *sets)
    kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered) if doc}
    if features:
        assert {
            "ServiceMonitor",
            "PrometheusRule",
            "ConfigMap",
            "NetworkPolicy",
            "PodDisruptionBudget",
        } <= kinds
        assert "vmm-dry-run-libvirtd" in rendered
    out = kubectl(
        "apply", "--server-side", "--force-conflicts", "--dry-run=server", "--validate=strict", "-f", "-",
        input_text=rendered,
    )  # fmt: skip
    assert "(server dry run)" in out
    assert len(out.strip().splitlines()) == len([d for d in yaml.safe_load_all(rendered) if d])


def test_a_strict_dry_run_would_refuse_an_unknown_field(
    control_plane: ControlPlane, kubectl: Kubectl
) -> None:
    """The check above can fail: the same dry run refuses a field the schema does not know."""
    kubectl("create", "namespace", "vmm-dry-run", check=False)
    rendered = helm(control_plane, "template", "vmm-dry-run", str(CHART), "-n", "vmm-dry-run")
    docs = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "PodDisruptionBudget"]
    docs[0]["spec"]["minAvailabel"] = 1
    proc = kubectl.run(
        "apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", "-",
        input_text=yaml.safe_dump_all(docs),
    )  # fmt: skip
    assert proc.returncode != 0
    assert ".spec.minAvailabel: field not declared in schema" in proc.stderr


def chart_before_head(dest: Path) -> str:
    """The chart as it was at the newest commit before HEAD that changed it: what users upgrade
    from. Returns that commit."""
    git = ["git", "-C", str(ROOT)]

    def earlier() -> str:
        return subprocess.run(
            [*git, "log", "-n1", "--format=%H", "HEAD~1", "--", "charts/formation-vmm"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip

    before = earlier()
    if not before:
        # A shallow clone (CI systems often make one): fetch the history it left out.
        subprocess.run([*git, "fetch", "--quiet", "--unshallow"], capture_output=True, check=False)
        before = earlier()
    assert before, "no earlier commit of the chart: this test needs the repository's history"
    archive = subprocess.run(
        [*git, "archive", before, "charts/formation-vmm"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return before


def test_an_upgrade_from_the_previous_chart_brings_the_crds_current(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Helm installs crds/ once and never upgrades them. The documented upgrade (README, "Install
    on a cluster") applies the new CRDs with `kubectl apply --server-side` before `helm upgrade`;
    done on a cluster of its own, from the chart of an earlier commit."""
    old = tmp_path_factory.mktemp("old-chart")
    chart_before_head(old)
    with private_plane(tmp_path_factory, "upgrade") as plane:
        k = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
        helm(plane, "install", "formation-vmm", str(old / "charts/formation-vmm"), "-n", "formation-vmm",
             "--create-namespace", "--wait=false")  # fmt: skip
        # The documented step, word for word.
        k("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
        helm(plane, "upgrade", "formation-vmm", str(CHART), "-n", "formation-vmm", "--wait=false")
        status = json.loads(helm(plane, "status", "formation-vmm", "-n", "formation-vmm", "-o", "json"))
        assert (status["info"]["status"], status["version"]) == ("deployed", 2)
        for path in sorted((CHART / "crds").glob("*.yaml")):
            want = yaml.safe_load(path.read_text())
            served = json.loads(k("get", "crd", want["metadata"]["name"], "-o", "json"))
            assert [v["schema"] for v in served["spec"]["versions"]] == [
                v["schema"] for v in want["spec"]["versions"]
            ]
        deployment = json.loads(
            k("get", "deployment/formation-vmm-controller", "-n", "formation-vmm", "-o", "json")
        )
        assert (
            deployment["spec"]["replicas"]
            == yaml.safe_load((CHART / "values.yaml").read_text())["controller"]["replicas"]
        )
