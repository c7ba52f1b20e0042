"""The container image the chart runs (`vmm controller`, `vmm agent`), built without a container
engine: mmdebstrap makes the Debian base from the packages in hack/image/packages, the project
and its pinned dependencies (hack/image/requirements.txt) are installed into /opt/vmm by
hack/image/install.sh in a chroot, umoci writes both as OCI layers, and skopeo packs them into
an OCI archive that containerd imports (`ctr images import`) and kind loads.

The Dockerfile runs the same package list and the same install script, so both produce the
same contents; tests/devcluster/test_operator_image.py holds them to it.

Two layers, each cached under $VMM_CACHE_DIR/operator-image/ by what makes it: the base (the
package list, this recipe) changes rarely and is reused; the application layer changes with
every commit and takes seconds. `hack/build-image` prints the archive's path. Needs root (the
base's files keep their owners; the install runs in a chroot)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from formation_vmm import __version__
from formation_vmm.version import commit

REPOSITORY = "formation/vmm"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# A fixed date for the base's files and the image's metadata (SOURCE_DATE_EPOCH): the same
# inputs give the same layer contents.
EPOCH = 1735689600  # 2025-01-01T00:00:00Z
# As debian:bookworm-slim leaves them out (docs, man pages, locales): nothing in the image reads them.
PATH_EXCLUDES = (
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/info/*",
    "/usr/share/locale/*",
    "/usr/share/i18n/*",
    "/usr/share/lintian/*",
)
ENV = ("PATH=/opt/vmm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",)
ENTRYPOINT = "/opt/vmm/bin/vmm"
MIB = 1024 * 1024


def repo_root() -> Path:
    """The checkout this module runs from (operator/formation_vmm/devcluster -> the root)."""
    return Path(__file__).resolve().parents[3]


def image_dir() -> Path:
    return repo_root() / "hack" / "image"


def packages(list_name: str = "packages") -> list[str]:
    """The Debian packages a list in hack/image/ names, one per line."""
    lines = (image_dir() / list_name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def cache_dir() -> Path:
    base = os.environ.get("VMM_CACHE_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "formation-vmm"
    )
    return Path(base) / "operator-image"


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def base_digest() -> str:
    return _digest(Path(__file__).read_bytes(), (image_dir() / "packages").read_bytes())


def source_files() -> list[Path]:
    """What the application layer is made of, relative to the checkout: the package's sources
    and metadata, and the image's install inputs."""
    root = repo_root()
    files = [root / "pyproject.toml", root / "README.md"]
    files += sorted(
        p
        for p in (root / "operator").rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
        and p.name != "_commit"
        and ".egg-info" not in str(p)
    )
    files += [image_dir() / name for name in ("packages", "install.sh", "requirements.txt")]
    return [p.relative_to(root) for p in files]


def app_digest(revision: str) -> str:
    root = repo_root()
    parts = [revision.encode(), base_digest().encode()]
    for relative in source_files():
        parts += [str(relative).encode(), (root / relative).read_bytes()]
    return _digest(*parts)


def archive_path(revision: str) -> Path:
    return cache_dir() / f"formation-vmm-{__version__}-{app_digest(revision)}.oci.tar"


def image_name() -> str:
    """The name and tag the archive carries: the chart's default (its appVersion)."""
    return f"{REPOSITORY}:{__version__}"


def run(*argv: str, **kwargs: object) -> None:
    subprocess.run(argv, check=True, **kwargs)  # type: ignore[call-overload]  # noqa: S603


def umoci(*args: str) -> None:
    run("umoci", *args)


CREATED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(EPOCH))
HISTORY = ("--history.created", CREATED, "--history.author", "hack/build-image")


def debian_base(dest: Path, included: list[str], *hooks: str) -> Path:
    """A Debian base (cached in ``dest``): minbase, as debian:bookworm-slim is, plus the
    ``included`` packages, without apt's lists and caches, after mmdebstrap's customize ``hooks``;
    as a root filesystem (`rootfs`, the install's chroot) and as the first layer of an OCI layout
    (`oci`, tag `base`). Also the libvirtd image's (libvirtd_image.py)."""
    if (dest / "oci").is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="partial-base-", dir=dest.parent))
    try:
        run(
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--aptopt=APT::Install-Recommends false",
            # /usr merged by mmdebstrap itself, not by the usrmerge package (which pulls in perl).
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            f"--include={','.join(included)}",
            *(f"--dpkgopt=path-exclude={pattern}" for pattern in PATH_EXCLUDES),
            *(f"--customize-hook={hook}" for hook in hooks),
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*',
            SUITE,
            str(scratch / "rootfs"),
            MIRROR,
            env={**os.environ, "SOURCE_DATE_EPOCH": str(EPOCH)},
        )
        ref = f"{scratch / 'oci'}:base"
        umoci("init", "--layout", str(scratch / "oci"))
        umoci("new", "--image", ref)
        umoci(
            "insert",
            "--image",
            ref,
            *HISTORY,
            "--history.created_by",
            "debian base",
            str(scratch / "rootfs"),
            "/",
        )
        scratch.rename(dest)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return dest


def stage_source(dest: Path, revision: str) -> Path:
    """A copy of the package's sources stamped with the commit (`_commit`, which `vmm --version`
    reads when no git checkout is around): what wheels and sdists are built from."""
    root = repo_root()
    for relative in source_files():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, target)
    (dest / "operator" / "formation_vmm" / "_commit").write_text(revision + "\n")
    return dest


def _wheels(work: Path, revision: str) -> Path:
    """The project's wheel (stamped with its commit) and its pinned dependencies' wheels, for
    this interpreter: Python 3.11 on Debian 12, as in the image."""
    src = stage_source(work / "src", revision)
    wheels = work / "wheels"
    pip = (sys.executable, "-m", "pip")
    quiet = ("--quiet", "--disable-pip-version-check")
    run(*pip, "wheel", *quiet, "--no-deps", "--wheel-dir", str(wheels), str(src))
    run(
        *pip, "download", *quiet, "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
        "--requirement", str(image_dir() / "requirements.txt"),
    )  # fmt: skip
    return wheels


def _install(work: Path, base: Path, wheels: Path) -> Path:
    """/opt/vmm, installed by hack/image/install.sh in a chroot of a copy of the base."""
    rootfs = work / "rootfs"
    run("cp", "-a", "--reflink=auto", str(base), str(rootfs))
    shutil.copytree(wheels, rootfs / "tmp" / "wheels")
    shutil.copy2(image_dir() / "install.sh", rootfs / "tmp" / "install.sh")
    # A clean environment: nothing of the host's pip or Python settings leaks into the image.
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}
    # Paths inside the chroot. Only /opt/vmm leaves it (the second layer); the copy is dropped.
    run("chroot", str(rootfs), "/bin/sh", "/tmp/install.sh", "/tmp/wheels", env=env, stdout=sys.stderr)  # noqa: S108
    return rootfs / "opt" / "vmm"


def build(revision: str | None = None) -> Path:
    """The OCI archive's path, built first if the cache lacks it."""
    revision = revision or commit()
    dest = archive_path(revision)
    if dest.is_file():
        return dest
    base = debian_base(cache_dir() / f"base-{base_digest()}", packages())
    with tempfile.TemporaryDirectory(prefix="image-", dir=cache_dir()) as scratch:
        work = Path(scratch)
        opt = _install(work, base / "rootfs", _wheels(work, revision))
        layout = work / "oci"
        shutil.copytree(base / "oci", layout)
        ref = f"{layout}:base"
        umoci("insert", "--image", ref, *HISTORY, "--history.created_by", "install.sh", str(opt), "/opt/vmm")
        umoci(
            "config", "--image", ref, "--tag", __version__, "--created", CREATED, "--author", "Formation VMM",
            *(f"--config.env={e}" for e in ENV), f"--config.entrypoint={ENTRYPOINT}",
            "--config.label", f"org.opencontainers.image.version={__version__}",
            "--config.label", f"org.opencontainers.image.revision={revision}",
            "--no-history",
        )  # fmt: skip
        ref = f"{layout}:{__version__}"
        partial = work / "image.oci.tar"
        run("skopeo", "copy", "--quiet", f"oci:{ref}", f"oci-archive:{partial}:{image_name()}")
        partial.rename(dest)
    prune("formation-vmm-*.oci.tar", 4)
    prune("base-*", 2)
    return dest


def prune(pattern: str, keep: int) -> None:
    """Keep the newest ``keep`` of the cache's entries matching ``pattern``: every commit makes
    a new archive, and checkouts side by side (a clone for `hack/dev-up`, another for work)
    still find theirs."""
    found = sorted(cache_dir().glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in found[keep:]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def report(name: str, path: Path, cached: bool, started: float) -> None:
    """What `hack/build-image` says on stderr, and the archive's path on stdout."""
    how = "cached" if cached else f"built in {time.monotonic() - started:.0f} s"
    print(f"build-image: {name} {path} ({path.stat().st_size / MIB:.0f} MiB, {how})", file=sys.stderr)
    print(path)


def config_of(archive: Path) -> dict[str, object]:
    """The image's config (labels, entrypoint, env) from an OCI archive, by skopeo."""
    done = subprocess.run(  # noqa: S603 - fixed argv
        ["skopeo", "inspect", "--config", f"oci-archive:{archive}"],  # noqa: S607
        capture_output=True,
        text=True,
        check=True,
    )
    config: dict[str, object] = json.loads(done.stdout)
    return config


def main() -> None:
    started = time.monotonic()
    revision = commit()
    cached = archive_path(revision).is_file()
    report(f"{image_name()} (commit {revision})", build(revision), cached, started)


if __name__ == "__main__":
    main()
