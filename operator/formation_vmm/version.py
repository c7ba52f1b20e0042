"""What `vmm --version` says: the package's version and the git commit it was built from.

An installed package (a wheel, the container image) carries the commit in `_commit`, a file the
builds write (hack/build-image, the Dockerfile's VMM_COMMIT); a source checkout (the editable
install of development) asks git, so the answer follows the checkout without a rebuild."""

import subprocess
from pathlib import Path

from formation_vmm import __version__

PACKAGE = Path(__file__).resolve().parent
COMMIT_FILE = PACKAGE / "_commit"


def commit() -> str:
    try:
        written = COMMIT_FILE.read_text().strip()
    except FileNotFoundError:
        written = ""
    if written:
        return written
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv
            ["git", "-C", str(PACKAGE), "describe", "--always", "--dirty", "--abbrev=12"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def describe() -> str:
    return f"formation-vmm {__version__} (commit {commit()})"
