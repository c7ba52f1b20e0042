"""Installing the product: `helm install` from charts/ and `kubectl apply -k manifests/`, both
against the real apiserver (lint and rendering alone: tests/charts)."""

import json
import subprocess
from pathlib import Path

import pytest

from formation_vmm.devcluster.cluster import Kubectl
from formation_vmm.devcluster.controlplane import ControlPlane, find_binaries

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
    # Server-side, as the CRDs were installed that way by the session fixture.
    kubectl("apply", "--server-side", "--force-conflicts", "-k", str(ROOT / "manifests"))
    kubectl(
        "get", "deployment/formation-vmm-controller", "daemonset/formation-vmm-agent", "-n", "formation-vmm"
    )
    kubectl("get", "clusterrolebinding/formation-vmm-controller", "clusterrolebinding/formation-vmm-agent")
