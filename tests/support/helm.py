"""The chart, and helm run on it (the binary the control-plane tier builds)."""

import subprocess
from pathlib import Path

from tests.support.binaries import binaries

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "formation-vmm"


def helm(*args: str) -> str:
    proc = subprocess.run([str(binaries() / "helm"), *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
