"""Why a snapshot or restore waits, as the controller words it. Pure."""

import pytest

from formation_vmm.controller.waiting import waiting_note, waiting_reason

pytestmark = pytest.mark.pure


def test_waiting_reasons() -> None:
    assert waiting_reason(None, "web") == "VirtualMachine web does not exist"
    assert waiting_reason({"status": {"phase": "Pending"}}, "web") == (
        "VirtualMachine web is not on a node yet (phase Pending)"
    )
    assert waiting_reason({}, "web") == "VirtualMachine web is not on a node yet (phase Pending)"
    assert waiting_reason({"status": {"nodeName": "node-a", "phase": "Running"}}, "web") is None


def test_a_note_is_written_once() -> None:
    said = {"phase": "Pending", "error": "VirtualMachine web does not exist"}
    assert waiting_note(None, "web", {}) == "VirtualMachine web does not exist"
    assert waiting_note(None, "web", said) is None  # said already: no write
    assert waiting_note({"status": {"nodeName": "n"}}, "web", said) is None  # its agent takes it
