"""The libvirtd image (`formation/vmm-libvirtd`), which the chart's libvirtd DaemonSet runs on
nodes that bring only /dev/kvm (`libvirtd.enabled`): libvirtd, virtlogd and QEMU from Debian's
packages (hack/image/libvirtd-packages), started by hack/image/libvirtd.sh under tini. Built as
the operator image's base is (operator_image.debian_base: mmdebstrap, umoci, skopeo, no
container engine), in one layer, and cached by what makes it; it changes with its package list
and script, not with our code. Needs root.

QEMU runs as libvirt-qemu (uid and gid 64055, as Debian's libvirt-daemon-system makes them),
made by hack/image/libvirtd-setup.sh. hack/image/libvirtd.Dockerfile builds the same for users
with Docker."""

import hashlib
import tempfile
import time
from pathlib import Path

from formation_vmm import __version__
from formation_vmm.devcluster.operator_image import (
    CREATED,
    cache_dir,
    debian_base,
    image_dir,
    packages,
    prune,
    report,
    run,
    umoci,
)

REPOSITORY = "formation/vmm-libvirtd"
PACKAGES = "libvirtd-packages"
SCRIPT = "libvirtd.sh"
QEMU_UID = 64055
SETUP = "libvirtd-setup.sh"
# mmdebstrap's customize hooks: the setup script (QEMU's user, the entrypoint) in a chroot, as
# libvirtd.Dockerfile runs it.
HOOKS = (
    f"copy-in {image_dir() / SETUP} {image_dir() / SCRIPT} /tmp",
    f'chroot "$1" sh /tmp/{SETUP}',
)
ENTRYPOINT = ("/usr/bin/tini", "--", f"/usr/local/bin/{SCRIPT}")


def image_name() -> str:
    return f"{REPOSITORY}:{__version__}"


def digest() -> str:
    h = hashlib.sha256()
    for part in (Path(__file__), image_dir() / PACKAGES, image_dir() / SETUP, image_dir() / SCRIPT):
        h.update(hashlib.sha256(part.read_bytes()).digest())
    h.update(__version__.encode())
    return h.hexdigest()[:16]


def archive_path() -> Path:
    return cache_dir() / f"libvirtd-{__version__}-{digest()}.oci.tar"


def build() -> Path:
    """The OCI archive's path, built first if the cache lacks it."""
    dest = archive_path()
    if dest.is_file():
        return dest
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="libvirtd-image-", dir=cache_dir()) as scratch:
        work = Path(scratch)
        base = debian_base(work / "base", packages(PACKAGES), *HOOKS)
        ref = f"{base / 'oci'}:base"
        umoci(
            "config", "--image", ref, "--tag", __version__, "--created", CREATED, "--author", "Formation VMM",
            *(f"--config.entrypoint={arg}" for arg in ENTRYPOINT),
            "--config.label", f"org.opencontainers.image.version={__version__}",
            "--no-history",
        )  # fmt: skip
        partial = work / "image.oci.tar"
        run(
            "skopeo",
            "copy",
            "--quiet",
            f"oci:{base / 'oci'}:{__version__}",
            f"oci-archive:{partial}:{image_name()}",
        )
        partial.rename(dest)
    prune("libvirtd-*.oci.tar", 2)
    return dest


def main() -> None:
    started = time.monotonic()
    cached = archive_path().is_file()
    report(image_name(), build(), cached, started)


if __name__ == "__main__":
    main()
