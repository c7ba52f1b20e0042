"""The container image the chart runs, built here without a container engine (hack/build-image):
what it reports, what it holds, and that the Dockerfile installs the same."""

import re
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from formation_vmm.devcluster import operator_image
from formation_vmm.version import commit, describe

pytestmark = pytest.mark.host  # mmdebstrap, umoci, skopeo and chroot, as root

ROOT = Path(__file__).resolve().parents[2]
COMPILERS = ("gcc", "cc", "c++", "ld", "as", "make", "pip", "pip3")


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The image archive (built or cached) and its root filesystem, unpacked by umoci."""
    archive = operator_image.build()
    work = tmp_path_factory.mktemp("image")
    layout = f"{work / 'oci'}:test"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"oci:{layout}"], check=True)
    unpack = ["umoci", "unpack", "--image", layout, str(work / "bundle")]
    subprocess.run(unpack, check=True, capture_output=True)
    return archive, work / "bundle" / "rootfs"


def in_image(rootfs: Path, *argv: str) -> str:
    env = {"PATH": "/opt/vmm/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    done = subprocess.run(["chroot", str(rootfs), *argv], capture_output=True, text=True, env=env, check=True)
    return done.stdout


def test_the_image_reports_the_version_and_commit_of_the_checkout(unpacked: tuple[Path, Path]) -> None:
    archive, rootfs = unpacked
    assert in_image(rootfs, "vmm", "--version").strip() == describe()
    assert in_image(rootfs, "kubectl-vm", "--version").strip() == describe()
    config = operator_image.config_of(archive)
    assert config["config"]["Entrypoint"] == [operator_image.ENTRYPOINT]  # type: ignore[index]
    assert config["config"]["Labels"]["org.opencontainers.image.revision"] == commit()  # type: ignore[index]
    # Named as the chart's default image (its appVersion), so a node that imported it runs it.
    chart = (ROOT / "charts/formation-vmm/Chart.yaml").read_text()
    assert f'appVersion: "{operator_image.image_name().split(":")[1]}"' in chart


def test_the_image_holds_its_packages_and_no_compilers(unpacked: tuple[Path, Path]) -> None:
    _, rootfs = unpacked
    installed = set(in_image(rootfs, "dpkg-query", "-W", "-f", "${Package}\n").split())
    assert set(operator_image.packages()) <= installed
    assert not {p for p in installed if p.endswith("-dev") or re.fullmatch(r"(gcc|g\+\+|cpp)(-\d+)?", p)}
    for tool in COMPILERS:
        found = subprocess.run(["chroot", str(rootfs), "sh", "-c", f"command -v {tool}"], check=False)
        assert found.returncode != 0, f"{tool} is in the image"
    # Debian's libvirt binding, the only one: none compiled from PyPI into the venv.
    binding = in_image(rootfs, "/opt/vmm/bin/python", "-c", "import libvirt; print(libvirt.__file__)")
    assert binding.startswith("/usr/lib/python3/dist-packages/")


def test_the_dockerfile_installs_what_the_recipe_installs() -> None:
    """No container engine here to build the Dockerfile: both read the same package list and run
    the same install script from the same pinned wheels, checked line by line."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM debian:bookworm-slim" in dockerfile and operator_image.SUITE == "bookworm"
    assert "COPY hack/image/packages hack/image/install.sh /tmp/image/" in dockerfile
    assert "grep -v '^#' /tmp/image/packages | xargs apt-get install -y --no-install-recommends" in dockerfile
    assert "RUN sh /tmp/image/install.sh /tmp/wheels" in dockerfile
    assert "--requirement /src/requirements.txt" in dockerfile
    assert "COPY hack/image/requirements.txt /src/requirements.txt" in dockerfile
    assert f'ENTRYPOINT ["{operator_image.ENTRYPOINT}"]' in dockerfile
    assert f"ENV {operator_image.ENV[0]}" in dockerfile
    assert 'echo "$VMM_COMMIT" > /src/operator/formation_vmm/_commit' in dockerfile


def test_the_pinned_requirements_satisfy_the_project() -> None:
    pins = {}
    for line in (ROOT / "hack/image/requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        requirement = Requirement(spec.split("#")[0])
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name == "libvirt-python":  # Debian's python3-libvirt (hack/image/packages)
            assert "python3-libvirt" in operator_image.packages()
            continue
        assert name in pins, f"{name} is not pinned in hack/image/requirements.txt"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} does not satisfy {spec}"
