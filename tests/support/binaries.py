"""The control-plane binaries (kube-apiserver, etcd, kubectl, helm, ...): found where
``$VMM_BIN_DIR`` says, else built by hack/control-plane-bins.sh (cached outside the clone) the
first time a test needs them. Never a reason to skip."""

import os
import subprocess
from pathlib import Path

from formation_vmm.devcluster.controlplane import ControlPlaneError, find_binaries

ROOT = Path(__file__).resolve().parents[2]


def binaries() -> Path:
    try:
        return find_binaries()
    except ControlPlaneError:
        built = subprocess.run(
            ["bash", str(ROOT / "hack" / "control-plane-bins.sh")], capture_output=True, text=True, check=True
        )
        os.environ["VMM_BIN_DIR"] = built.stdout.strip().splitlines()[-1]
        return find_binaries()
