"""Each VM's QEMU uid (qemu_uids.py): derived, recorded, unique cluster-wide, and what the
domain says of it. Pure; a real QEMU running as it, and what it cannot touch, is in
tests/security/test_qemu_uids.py."""

import xml.etree.ElementTree as ET

import pytest

from formation_vmm.api.names import QEMU_UID_ANNOTATION
from formation_vmm.domain.build import build_domain_spec
from formation_vmm.domain.xml import domain_xml
from formation_vmm.qemu_uids import BASE, SPAN, UidBook, derived_uid, qemu_owner, recorded_uid
from tests.support.factories import make_vm
from tests.support.golden import LAYOUT

pytestmark = pytest.mark.pure


def test_a_uid_is_derived_from_the_vm_in_its_range_and_records_read_back() -> None:
    uid = derived_uid("uid-1")
    assert BASE <= uid < BASE + SPAN and uid == derived_uid("uid-1") != derived_uid("uid-1", 1)
    assert recorded_uid({QEMU_UID_ANNOTATION: str(uid)}) == uid
    for forged in ("0", "65534", str(BASE - 1), str(BASE + SPAN), "1e9", "-5", ""):
        assert recorded_uid({QEMU_UID_ANNOTATION: forged}) is None, forged


def test_no_two_vms_hold_one_uid() -> None:
    book = UidBook()
    book.record("vm-a", derived_uid("vm-b"))  # vm-a holds what vm-b would derive first
    b = book.assign("vm-b")
    assert b == derived_uid("vm-b", 1) and book.assign("vm-b") == b
    book.record("vm-c", b)  # a record naming another's uid is not believed
    assert book.assign("vm-c") == derived_uid("vm-c")
    book.release("vm-a")
    assert book.assign("vm-d") == derived_uid("vm-d")


def test_the_domain_runs_as_its_uid_in_the_nodes_group_and_relabels_nothing() -> None:
    vm = make_vm("web", uid="uid-7")
    assert qemu_owner(vm) is None  # bound before uids were recorded: the node's QEMU user
    assert ET.fromstring(domain_xml(build_domain_spec(vm, LAYOUT, "qemu"))).find("seclabel") is None
    vm.metadata.annotations[QEMU_UID_ANNOTATION] = str(BASE + 42)
    assert qemu_owner(vm) == (BASE + 42, BASE + 42) and qemu_owner(vm, 107) == (BASE + 42, 107)
    spec = build_domain_spec(vm, LAYOUT, "qemu", qemu=qemu_owner(vm, 107))
    label = ET.fromstring(domain_xml(spec)).find("seclabel")
    assert label is not None and label.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert label.findtext("label") == f"+{BASE + 42}:+107"
