"""The libvirtd image (hack/build-image --libvirtd), built here without a container engine: what
it holds and runs, and that libvirtd.Dockerfile installs the same. It runs for real in the node
tier (tests/node/test_dev_kubelet.py)."""

import subprocess
from pathlib import Path

import pytest

from formation_vmm.devcluster import libvirtd_image, operator_image

pytestmark = pytest.mark.host  # mmdebstrap, umoci, skopeo and chroot, as root

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    archive = libvirtd_image.build()
    work = tmp_path_factory.mktemp("libvirtd-image")
    layout = f"{work / 'oci'}:test"
    subprocess.run(["skopeo", "copy", "--quiet", f"oci-archive:{archive}", f"oci:{layout}"], check=True)
    subprocess.run(
        ["umoci", "unpack", "--image", layout, str(work / "bundle")], check=True, capture_output=True
    )
    return work / "bundle" / "rootfs"


def in_image(rootfs: Path, *argv: str) -> str:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    return subprocess.run(
        ["chroot", str(rootfs), *argv], capture_output=True, text=True, env=env, check=True
    ).stdout


def test_the_image_holds_libvirtd_qemu_and_qemus_own_user(rootfs: Path) -> None:
    installed = set(in_image(rootfs, "dpkg-query", "-W", "-f", "${Package}\n").split())
    assert set(operator_image.packages(libvirtd_image.PACKAGES)) <= installed
    assert "libvirt-daemon-system" not in installed and "systemd" not in installed
    assert in_image(rootfs, "libvirtd", "--version").startswith("libvirtd (libvirt) 9.")
    assert in_image(rootfs, "qemu-system-x86_64", "--version").startswith("QEMU emulator version 7.")
    # The standard network filters, where libvirtd reads them (the agent's guests use one).
    assert (rootfs / "etc/libvirt/nwfilter/clean-traffic.xml").is_file()
    uid = libvirtd_image.QEMU_UID
    assert f"libvirt-qemu:x:{uid}:{uid}:" in (rootfs / "etc/passwd").read_text()
    assert (rootfs / "root").stat().st_mode & 0o777 == 0o711
    assert (rootfs / "usr/local/bin/libvirtd.sh").stat().st_mode & 0o777 == 0o755
    assert not list((rootfs / "tmp").iterdir())


def test_the_image_runs_libvirtd_under_tini() -> None:
    config = operator_image.config_of(libvirtd_image.build())
    assert config["config"]["Entrypoint"] == list(libvirtd_image.ENTRYPOINT)  # type: ignore[index]
    assert (
        libvirtd_image.image_name() == "formation/vmm-libvirtd:" + operator_image.image_name().split(":")[1]
    )


def test_the_dockerfile_installs_what_the_recipe_installs() -> None:
    """Both read the same package list and run the same setup script, checked line by line."""
    dockerfile = (ROOT / "hack/image/libvirtd.Dockerfile").read_text()
    assert "FROM debian:bookworm-slim" in dockerfile and operator_image.SUITE == "bookworm"
    assert f"COPY hack/image/{libvirtd_image.PACKAGES} /tmp/packages" in dockerfile
    assert "grep -v '^#' /tmp/packages | xargs apt-get install -y --no-install-recommends" in dockerfile
    assert f"COPY hack/image/{libvirtd_image.SETUP} hack/image/{libvirtd_image.SCRIPT} /tmp/" in dockerfile
    assert f"RUN sh /tmp/{libvirtd_image.SETUP}" in dockerfile
    entrypoint = ", ".join(f'"{arg}"' for arg in libvirtd_image.ENTRYPOINT)
    assert f"ENTRYPOINT [{entrypoint}]" in dockerfile
