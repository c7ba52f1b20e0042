"""The README's "Install on a cluster" block holds the steps the node tier runs on a real
kubelet node (node_cluster.py's constants, tests/node/), word for word, so what users copy is
what is tested."""

import re
from pathlib import Path

import pytest

from formation_vmm.devcluster.node_cluster import (
    APPLY_SAMPLE,
    HELM_INSTALL,
    HELM_UPGRADE,
    LABEL_NODE,
    SAMPLE_FILES,
)

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]
TCG_VALUES = " -f charts/formation-vmm/ci/tcg-values.yaml"


def install_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Install on a cluster", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "one block of commands in the section"
    return str(blocks[0])


def test_the_readme_install_block_is_the_node_tiers_steps() -> None:
    block = install_block()
    # Users with KVM install without the TCG values; the block says when to add them.
    assert HELM_INSTALL.endswith(TCG_VALUES) and HELM_UPGRADE.endswith(TCG_VALUES)
    assert HELM_INSTALL.removesuffix(TCG_VALUES) + "\n" in block
    assert f"#   {TCG_VALUES.strip()}\n" in block
    assert HELM_UPGRADE.removesuffix(TCG_VALUES) + "\n" in block
    assert LABEL_NODE.format(node="NODE") + "\n" in block
    assert APPLY_SAMPLE in block
    assert SAMPLE_FILES.format(images="/var/lib/formation/vm-images") in block
    for step in (
        "hack/build-image ",
        "--set libvirtd.enabled=true",
        "hack/build-image --libvirtd",
        "kubectl apply -k manifests/",
        "kubectl apply --server-side --force-conflicts -f charts/formation-vmm/crds/",
        "helm uninstall formation-vmm -n formation-vmm",
    ):
        assert step in block, step
