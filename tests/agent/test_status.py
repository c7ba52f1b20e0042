"""The status the agent writes (``status_after``) and whether it writes at all (``changes``).
Pure."""

import json
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from formation_vmm.agent.hypervisor.guest_agent import os_info_of
from formation_vmm.agent.plan import Action, Actual, DomainState, ShutoffReason
from formation_vmm.agent.probes.probe_state import Readiness
from formation_vmm.agent.state import DomainInfo, Outcome
from formation_vmm.agent.vms.status import (
    NOTHING_BOOTABLE_MESSAGE,
    RESTART_REQUIRED_MESSAGE,
    boot_source,
    bound_fields,
    changes,
    status_after,
    status_unknown,
    status_waiting,
)
from formation_vmm.api.models import (
    GUEST_INFO_MAX,
    GuestOSInfo,
    VirtualMachine,
    VirtualMachineStatus,
    to_wire,
)
from formation_vmm.api.names import ADDRESSES_ANNOTATION
from formation_vmm.domain.spec import Owner
from formation_vmm.macs import legacy_mac
from tests.support.factories import make_vm

pytestmark = pytest.mark.pure

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LATER = datetime(2026, 3, 1, 12, 5, tzinfo=UTC)
OWNER = Owner(namespace="default", name="vm1", uid="uid-1")


def domain(
    state: DomainState, spec_hash: str = "h1", reason: ShutoffReason = ShutoffReason.NEVER_STARTED
) -> DomainInfo:
    return DomainInfo(
        "default_vm1", "dom-uuid", OWNER, Actual(state, reason, spec_hash, owner_uid="uid-1"), 1, 65536
    )


def conditions(status: VirtualMachineStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_a_first_start_reports_running_ready_and_when() -> None:
    vm = make_vm(networks=[{"name": "eth0"}])
    out = Outcome([Action.PREPARE_FILES, Action.DEFINE, Action.START], domain(DomainState.RUNNING), "h1")
    status = status_after(vm, vm.status, out, "node-a", AT)
    wire = to_wire(status)
    assert wire["phase"] == "Running" and wire["nodeName"] == "node-a" and wire["domainUUID"] == "dom-uuid"
    assert wire["startedAt"] == "2026-03-01T12:00:00Z"
    assert "restartCount" not in wire  # a first start is no restart
    assert conditions(status) == {
        "Ready": ("True", "Running"),
        "Paused": ("False", "NotPaused"),
        "RestartRequired": ("False", "UpToDate"),
        "ImageReady": ("True", "ImagesReady"),
        "Bootable": ("False", "NothingBootable"),  # no kernel, no disk: says so, and runs
        "NetworkReady": ("True", "NetworksReady"),
        "AddressesMatch": ("True", "AsAssigned"),
        "LiveMigratable": ("True", "Migratable"),
    }
    assert wire["interfaces"] == [{"name": "eth0", "mac": legacy_mac("uid-1", "eth0"), "network": "default"}]


def test_a_later_start_counts_a_restart() -> None:
    vm = make_vm()
    old = VirtualMachineStatus(started_at=AT, restart_count=2)
    out = Outcome([Action.START], domain(DomainState.RUNNING), "h1")
    assert status_after(vm, old, out, "n", LATER).restart_count == 3


def test_a_graceful_stop_in_progress_is_stopping_and_not_ready() -> None:
    vm = make_vm(runStrategy="Halted")
    out = Outcome([Action.SHUTDOWN], domain(DomainState.RUNNING), "h1", stopping=True, requeue_after=30)
    status = status_after(vm, vm.status, out, "n", AT)
    assert status.phase == "Stopping"
    assert conditions(status)["Ready"] == ("False", "DomainStopping")


def test_a_changed_spec_on_a_running_domain_requires_a_restart() -> None:
    vm = make_vm()
    status = status_after(vm, vm.status, Outcome([], domain(DomainState.RUNNING, "old"), "new"), "n", AT)
    required = next(c for c in status.conditions if c.type == "RestartRequired")
    assert (required.status, required.message) == ("True", RESTART_REQUIRED_MESSAGE)


def test_a_restart_is_recorded_only_when_it_was_carried_out() -> None:
    vm = make_vm(restartRequestedAt="2026-03-01T11:59:00Z")
    waiting = Outcome([Action.SHUTDOWN], domain(DomainState.RUNNING), "h1", stopping=True)
    assert "lastRestartRequestedAt" not in to_wire(status_after(vm, vm.status, waiting, "n", AT))
    done = Outcome([Action.START], domain(DomainState.RUNNING), "h1", restart_done=True)
    assert (
        to_wire(status_after(vm, vm.status, done, "n", AT))["lastRestartRequestedAt"]
        == "2026-03-01T11:59:00Z"
    )


def test_deleting_reports_terminating() -> None:
    vm = make_vm()
    out = Outcome([Action.SHUTDOWN], domain(DomainState.RUNNING), None, stopping=True)
    status = status_after(vm, vm.status, out, "n", AT, deleting=True)
    assert status.phase == "Terminating" and "ImageReady" not in conditions(status)


def test_no_change_means_no_write() -> None:
    vm = make_vm()
    out = Outcome([], domain(DomainState.RUNNING), "h1")
    first = to_wire(status_after(vm, vm.status, out, "n", AT))
    # Read back as the API stores it, and synced again later: nothing to write.
    again = status_after(vm, VirtualMachineStatus.model_validate(first), out, "n", LATER)
    assert changes(first, again) == {}
    # The domain stopped: phase, message and the Ready condition change, nothing else.
    stopped = status_after(
        vm,
        VirtualMachineStatus.model_validate(first),
        Outcome([], domain(DomainState.SHUTOFF), "h1"),
        "n",
        LATER,
    )
    assert set(changes(first, stopped)) == {"phase", "message", "conditions"}


def test_libvirt_unavailable_keeps_the_phase_and_says_unknown() -> None:
    vm = make_vm()
    old = VirtualMachineStatus(phase="Running")
    status = status_unknown(vm, old, "HypervisorUnavailable", "libvirt is unavailable")
    wire = to_wire(status)
    assert "phase" not in wire
    assert conditions(status)["Ready"] == ("Unknown", "HypervisorUnavailable")


def test_waiting_for_an_image_is_provisioning() -> None:
    vm = make_vm()
    status = status_waiting(vm, vm.status, "ImageDownloading", "VmImage x is downloading")
    assert status.phase == "Provisioning"
    assert conditions(status)["ImageReady"] == ("False", "ImageDownloading")


def _running() -> Outcome:
    return Outcome([], domain(DomainState.RUNNING), "h1")


def _addressed(value: str = "eth0=default/10.123.0.5") -> VirtualMachine:
    """A VM as the controller bound it: the addresses annotation is its assignment."""
    vm = make_vm(networks=[{"name": "eth0"}])
    vm.metadata.annotations[ADDRESSES_ANNOTATION] = value
    return vm


def test_the_assigned_address_shows_from_the_first_write_and_what_agrees_joins_its_source() -> None:
    vm = _addressed()
    mac = legacy_mac("uid-1", "eth0")
    nothing = status_after(vm, VirtualMachineStatus(), _running(), "node-a", AT)
    assert to_wire(nothing)["interfaces"][0] == {
        "name": "eth0",
        "mac": mac,
        "network": "default",
        "ipAddress": "10.123.0.5",
        "infoSource": "ipam",
    }
    seen = replace(_running(), addresses={mac: {"lease": "10.123.0.5", "guest-agent": "10.123.0.5"}})
    agreed = status_after(vm, nothing, seen, "node-a", AT)
    assert agreed.interfaces[0].info_source == "ipam, guest-agent, lease"
    assert conditions(agreed)["AddressesMatch"] == ("True", "AsAssigned")


def test_an_address_a_status_claims_through_ipam_is_not_shown_again() -> None:
    """Only the controller's annotation records an assignment (issue 26, finding 2): a status
    claiming one (as a forger would write it) is dropped at the agent's next write."""
    old = {"name": "eth0", "network": "default", "ipAddress": "10.123.0.1", "infoSource": "ipam, lease"}
    vm = make_vm(networks=[{"name": "eth0"}])
    vm.status = VirtualMachineStatus.model_validate({"interfaces": [old]})
    status = status_after(vm, vm.status, _running(), "node-a", AT)
    assert status.interfaces[0].ip_address is None and status.interfaces[0].info_source is None


def test_a_report_that_contradicts_the_assignment_is_a_condition_never_the_address() -> None:
    vm = _addressed()
    mac = legacy_mac("uid-1", "eth0")
    seen = replace(_running(), addresses={mac: {"guest-agent": "10.123.0.99"}})
    status = status_after(vm, VirtualMachineStatus(), seen, "node-a", AT)
    assert status.interfaces[0].ip_address == "10.123.0.5" and status.interfaces[0].info_source == "ipam"
    cond = next(c for c in status.conditions if c.type == "AddressesMatch")
    assert (cond.status, cond.reason) == ("False", "AddressMismatch")
    assert cond.message == "interface eth0: guest-agent reports 10.123.0.99, but 10.123.0.5 is assigned"


def test_every_status_write_says_where_the_vm_is_bound_and_only_once() -> None:
    vm = make_vm(cpus=3)
    fields = bound_fields(status_waiting(vm, vm.status, "ImageDownloading", "x"), vm.status, vm, "n1")
    assert (fields.node_name, fields.vcpus) == ("n1", 3)
    assert conditions(fields)["Scheduled"] == ("True", "Scheduled")
    stamp = next(c for c in fields.conditions if c.type == "Scheduled").last_transition_time
    again = bound_fields(status_waiting(vm, fields, "ImageDownloading", "x"), fields, vm, "n1")
    assert next(c for c in again.conditions if c.type == "Scheduled").last_transition_time == stamp


def test_without_an_assignment_the_lease_shows_and_an_empty_lookup_keeps_it() -> None:
    vm = make_vm(networks=[{"name": "lan", "network": "bridged"}])
    mac = legacy_mac("uid-1", "lan")
    first = status_after(
        vm, VirtualMachineStatus(), replace(_running(), addresses={mac: {"lease": "192.0.2.7"}}), "n", AT
    )
    assert (first.interfaces[0].ip_address, first.interfaces[0].info_source) == ("192.0.2.7", "lease")
    later = status_after(vm, first, _running(), "n", AT)
    assert (later.interfaces[0].ip_address, later.interfaces[0].info_source) == ("192.0.2.7", "lease")


def test_with_a_readiness_probe_a_running_vm_is_starting_until_it_passes_then_ready_while_it_does() -> None:
    vm = make_vm(readinessProbe={"tcpSocket": {"port": 22}})
    pending = status_after(vm, VirtualMachineStatus(), _running(), "n", AT)
    assert pending.phase == "Starting"
    assert conditions(pending)["Ready"] == ("False", "ReadinessProbePending")
    passed = Readiness(True, True, "ReadinessProbeSucceeded", "readiness probe tcpSocket :22 answers")
    ready = status_after(vm, pending, _running(), "n", AT, readiness=passed)
    assert ready.phase == "Running" and conditions(ready)["Ready"] == ("True", "ReadinessProbeSucceeded")
    failing = Readiness(
        False, True, "ReadinessProbeFailed", "readiness probe tcpSocket :22: Connection refused"
    )
    later = status_after(vm, ready, _running(), "n", AT, readiness=failing)
    assert later.phase == "Running"  # it was ready in this run: Running, not Ready
    ready_condition = next(c for c in later.conditions if c.type == "Ready")
    assert (ready_condition.status, ready_condition.message) == ("False", failing.message)
    stopped = status_after(vm, later, Outcome([], domain(DomainState.SHUTOFF), "h1"), "n", AT)
    assert stopped.phase == "Stopped" and conditions(stopped)["Ready"] == ("False", "DomainStopped")


def test_the_guest_os_shows_while_the_vm_runs_and_goes_when_it_stops() -> None:
    vm = make_vm()
    info = GuestOSInfo(name="Debian GNU/Linux", version_id="12", kernel_release="6.1.0-50-cloud-amd64")
    told = to_wire(
        status_after(vm, vm.status, Outcome([], domain(DomainState.RUNNING), "h1", guest_os=info), "n", AT)
    )
    assert told["guestOSInfo"] == {
        "name": "Debian GNU/Linux",
        "versionId": "12",
        "kernelRelease": "6.1.0-50-cloud-amd64",
    }
    # A later sync whose guest agent did not answer (busy, or the guest paused) keeps it: no write.
    old = VirtualMachineStatus.model_validate(told)
    for state in (DomainState.RUNNING, DomainState.PAUSED):
        again = status_after(vm, old, Outcome([], domain(state), "h1"), "n", LATER)
        assert "guestOSInfo" not in changes(told, again)
    # Stopped: removed (null in the patch), and not written again once gone.
    stopped = status_after(vm, old, Outcome([], domain(DomainState.SHUTOFF), "h1"), "n", LATER)
    assert changes(told, stopped)["guestOSInfo"] is None
    gone = to_wire(stopped)
    gone.pop("guestOSInfo")
    later = status_after(
        vm,
        VirtualMachineStatus.model_validate(gone),
        Outcome([], domain(DomainState.SHUTOFF), "h1"),
        "n",
        LATER,
    )
    assert "guestOSInfo" not in to_wire(later)


def test_the_guest_agents_os_answer_is_taken_only_as_bounded_strings() -> None:
    answer = {
        "return": {
            "name": "Debian GNU/Linux",
            "pretty-name": "x" * 1000,
            "version-id": 12,  # not a string: left out
            "kernel-release": "6.1.0",
            "evil": "ignored",
        }
    }
    info = os_info_of(json.dumps(answer))
    assert info is not None
    assert to_wire(info) == {
        "name": "Debian GNU/Linux",
        "prettyName": "x" * GUEST_INFO_MAX,
        "kernelRelease": "6.1.0",
    }
    for bad in ("not json", "[]", '{"error": {"class": "CommandNotFound"}}', '{"return": {}}'):
        assert os_info_of(bad) is None


@pytest.mark.parametrize(
    ("spec", "source"),
    [
        ({}, None),
        ({"disks": [{"name": "scratch", "size": "1Gi"}]}, None),  # a blank disk boots nothing
        ({"kernel": {"image": "k"}}, "kernel k"),
        ({"disks": [{"name": "data", "size": "1Gi"}, {"name": "root", "image": "debian"}]}, "disk root"),
        # A blank disk the user says boots (an OS installed onto it earlier) comes before an image.
        (
            {"disks": [{"name": "root", "image": "debian"}, {"name": "os", "size": "9Gi", "bootOrder": 1}]},
            "disk os",
        ),
        (
            {
                "disks": [
                    {"name": "a", "image": "x", "bootOrder": 2},
                    {"name": "b", "image": "y", "bootOrder": 1},
                ]
            },
            "disk b",
        ),
    ],
)
def test_the_bootable_condition_names_what_the_vm_boots_from(
    spec: dict[str, object], source: str | None
) -> None:
    vm = make_vm(**spec)
    assert boot_source(vm) == source
    status = status_after(vm, vm.status, Outcome([], domain(DomainState.RUNNING), "h1"), "n", AT)
    bootable = next(c for c in status.conditions if c.type == "Bootable")
    assert (bootable.status, bootable.reason) == (
        ("True", "HasBootSource") if source else ("False", "NothingBootable")
    )
    assert bootable.message == (source or NOTHING_BOOTABLE_MESSAGE)


@pytest.mark.parametrize(
    ("spec", "state", "snapshots", "reason"),
    [
        ({}, DomainState.RUNNING, 0, "Migratable"),
        ({}, DomainState.PAUSED, 0, "Paused"),
        ({"networks": [{"name": "eth0", "bridge": "br0"}]}, DomainState.RUNNING, 0, "HostBridge"),
        ({"firmware": {"type": "efi"}}, DomainState.RUNNING, 0, "UefiNvram"),
        ({}, DomainState.RUNNING, 1, "HasSnapshots"),  # one being taken counts
    ],
)
def test_live_migratable_says_what_keeps_the_vm_from_moving(
    spec: dict[str, object], state: DomainState, snapshots: int, reason: str
) -> None:
    vm = make_vm(**spec)
    out = Outcome([], domain(state), "h1")
    status = status_after(vm, vm.status, out, "node-a", AT, snapshots=snapshots)
    assert conditions(status)["LiveMigratable"] == ("True" if reason == "Migratable" else "False", reason)
