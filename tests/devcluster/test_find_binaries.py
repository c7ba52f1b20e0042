"""Every `vmm dev` verb finds the control-plane binaries the same way (issue 27: `vmm dev up
--kubelet` did not, after `hack/dev-up`, where plain `vmm dev up` did): without VMM_BIN_DIR,
from the cache hack/control-plane-bins.sh fills, or from what a dev cluster recorded."""

from pathlib import Path

import pytest

from formation_vmm.devcluster.controlplane import BINARIES, ControlPlaneError, find_binaries
from tests.support.binaries import binaries

pytestmark = pytest.mark.host


def test_without_the_environment_the_scripts_cache_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    built = binaries()  # built (and cached) if this machine had none yet
    monkeypatch.delenv("VMM_BIN_DIR", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    assert find_binaries() == built


def test_a_recorded_directory_is_found_and_an_incomplete_one_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VMM_BIN_DIR", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("VMM_CACHE_DIR", str(tmp_path / "empty-cache"))  # the script's cache: none
    bins = tmp_path / "bins"
    bins.mkdir()
    for name in BINARIES[:-1]:
        (bins / name).touch()
    recorded = tmp_path / "bin-dir"
    recorded.write_text(f"{bins}\n")
    with pytest.raises(ControlPlaneError, match=r"hack/control-plane-bins\.sh"):
        find_binaries(recorded=recorded)
    (bins / BINARIES[-1]).touch()
    assert find_binaries(recorded=recorded) == bins
