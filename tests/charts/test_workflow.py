"""The GitHub Actions workflow cannot run here: actionlint checks it, and its install steps are
held to the node tier's (tests/node/test_helm_install.py), which runs them on a real node."""

import subprocess
from pathlib import Path

import pytest
import yaml

from formation_vmm.devcluster.node_cluster import APPLY_SAMPLE, HELM_INSTALL, LABEL_NODE, SAMPLE_FILES
from tests.support.binaries import binaries

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yaml"


def test_actionlint_accepts_the_workflow() -> None:
    done = subprocess.run(
        [str(binaries() / "actionlint"), str(WORKFLOW)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_would_refuse_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / ".github" / "workflows" / "ci.yaml"
    broken.parent.mkdir(parents=True)
    broken.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs-on: ${{ matrix.os }}", 1))
    done = subprocess.run(
        [str(binaries() / "actionlint"), str(broken)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and "matrix" in done.stdout


def run_lines() -> str:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    return "\n".join(step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"])


def test_the_kind_job_runs_the_node_tiers_install_steps() -> None:
    runs = run_lines()
    assert HELM_INSTALL in runs
    assert LABEL_NODE.format(node="vmm-control-plane") in runs
    assert APPLY_SAMPLE in runs
    assert SAMPLE_FILES.format(images="/var/lib/formation/vm-images") in runs
    assert "kubectl wait --for=jsonpath='{.status.phase}'=Running" in runs
    # The image: the Dockerfile on GitHub (it has Docker), hack/build-image here; the same
    # contents (tests/devcluster/test_operator_image.py) under the chart's default name.
    assert "docker build" in runs and "-t formation/vmm:0.1.0" in runs
    assert "kind load docker-image formation/vmm:0.1.0" in runs


def test_the_unit_job_runs_the_lint_of_hack_test() -> None:
    runs = run_lines()
    hack_test = (ROOT / "hack" / "test").read_text()
    for line in (
        "ruff check operator tests bench",
        "ruff format --check operator tests bench",
        "mypy",
        "lint-imports",
    ):
        assert line in hack_test and line in runs
    assert "python -m pytest -m pure" in runs
