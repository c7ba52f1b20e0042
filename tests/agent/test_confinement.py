"""Which node libvirt the agent refuses to run QEMU on: the capabilities XML of real libvirtds
(a Debian host with AppArmor, one with DAC as root as our test node has, the test driver)."""

import pytest

from formation_vmm.agent.vms.confinement import confinement_problem

pytestmark = pytest.mark.pure


def caps(*secmodels: tuple[str, list[str]]) -> str:
    body = "".join(
        f"<secmodel><model>{model}</model><doi>0</doi>"
        + "".join(f"<baselabel type='kvm'>{label}</baselabel>" for label in labels)
        + "</secmodel>"
        for model, labels in secmodels
    )
    return f"<capabilities><host><uuid>x</uuid>{body}</host></capabilities>"


def test_apparmor_or_an_unprivileged_qemu_user_confines() -> None:
    assert confinement_problem(caps(("apparmor", []), ("dac", ["+64055:+64055"]))) is None
    assert confinement_problem(caps(("none", []), ("dac", ["+64055:+994"]))) is None
    assert confinement_problem(caps(("testSecurity", []))) is None


def test_no_driver_or_dac_as_root_is_refused_with_the_reason() -> None:
    why = confinement_problem(caps(("none", [])))
    assert why is not None and "no security driver" in why
    assert confinement_problem("<capabilities><host/></capabilities>") == why
    why = confinement_problem(caps(("none", []), ("dac", ["+0:+0"])))
    assert why is not None and "runs it as root" in why
