"""What `pip install` of a release gives users: the sdist and wheel pass `twine check`, and the
wheel, installed on its own, provides `vmm` and `kubectl-vm`, which report the version and the
commit they were built from."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from formation_vmm.devcluster.operator_image import stage_source
from formation_vmm.version import commit, describe

pytestmark = pytest.mark.host  # builds with setuptools from PyPI, installs into a directory


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("dist")
    src = stage_source(work / "src", commit())
    out = work / "dist"
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(out), str(src)],
                   check=True, capture_output=True)  # fmt: skip
    return out


def test_twine_accepts_the_sdist_and_the_wheel(dist: Path) -> None:
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"]
    done = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, files)],
                          check=False, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2


def test_the_installed_wheel_gives_both_commands_with_the_commit(dist: Path, tmp_path: Path) -> None:
    wheel = next(dist.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "formation_vmm/_commit" in names and "formation_vmm/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "hack/"))]
    target = tmp_path / "site"
    # Only the wheel itself: its dependencies are this interpreter's (the test venv's).
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(target)}
    for command in ("vmm", "kubectl-vm"):
        script = target / "bin" / command
        assert script.is_file(), f"the wheel gives no {command}"
        out = subprocess.run([str(script), "--version"], capture_output=True, text=True, env=env, check=True)
        assert out.stdout.strip() == describe()
        # From the wheel, not the checkout: the stamped commit, no git asked.
        where = subprocess.run([sys.executable, "-c", "import formation_vmm; print(formation_vmm.__file__)"],
                               capture_output=True, text=True, env=env, check=True)  # fmt: skip
        assert where.stdout.startswith(str(target))
