"""Admission of a bound VM's spec change (controller/binding/admission.py, api/admission.py): the
table of what is admitted and what waits, and the record both processes read. Pure."""

import pytest

from formation_vmm.api.admission import Admitted, admitted_of, change_held, request_digest
from formation_vmm.api.models import VirtualMachineSpec
from formation_vmm.api.names import ADMITTED_ANNOTATION
from formation_vmm.controller.binding.admission import change_refusal
from formation_vmm.placement import Load, NodeInfo, Request
from formation_vmm.quota import Quota, Usage

pytestmark = pytest.mark.pure

GI = 1 << 30
NODE = NodeInfo("node-a", {}, cpus=4, memory=8 * GI, disk=100 * GI)


def spec(**kw: object) -> VirtualMachineSpec:
    return VirtualMachineSpec.model_validate({"cpus": 1, "memory": "1Gi", **kw})


@pytest.mark.parametrize(
    ("request_", "node_load", "quotas", "usage", "expected"),
    [
        # Shrinking or keeping the size: always, whatever the node and the quota say now.
        (Request(1, GI), Load(9, 20 * GI), [Quota("q", cpus=0)], Usage(9, 9 * GI), None),
        # Growing within the node's room and the quota.
        (Request(2, 2 * GI), Load(2, 2 * GI), [Quota("q", cpus=4)], Usage(2, 2 * GI), None),
        # Growing past the node: its own share is taken out first (4 vCPUs: 3 others + 2 > 4).
        (Request(2, GI), Load(4, 2 * GI), [], Usage(), "InsufficientRoom"),
        (Request(1, 9 * GI), Load(1, GI), [], Usage(), "InsufficientRoom"),
        (Request(1, GI, disk=200 * GI), Load(1, GI), [], Usage(), "InsufficientRoom"),
        # Growing past the namespace's quota.
        (Request(3, GI), Load(1, GI), [Quota("q", cpus=2)], Usage(1, GI), "QuotaExceeded"),
    ],
)
def test_what_a_change_may_take(
    request_: Request, node_load: Load, quotas: list[Quota], usage: Usage, expected: str | None
) -> None:
    refusal = change_refusal(request_, Load(1, GI), NODE, node_load, quotas, usage, 1.0, 1.0)
    assert (refusal.reason if refusal else None) == expected


def test_a_refusal_says_what_is_free() -> None:
    refusal = change_refusal(Request(64, 256 * GI), Load(1, GI), NODE, Load(2, 2 * GI), [], Usage(), 1.0, 1.0)
    assert refusal is not None and refusal.message == "node node-a has 3 vCPUs free for it"
    refusal = change_refusal(Request(2, GI), Load(1, GI), None, Load(), [], Usage(), 1.0, 1.0)
    assert refusal is not None and "not known" in refusal.message


def test_the_digest_covers_what_admission_judges_and_nothing_else() -> None:
    base = spec(networks=[{"name": "eth0"}], disks=[{"name": "root", "size": "1Gi"}])
    same = {request_digest(base)}
    for judged in (
        {"cpus": 2},
        {"memory": "2Gi"},
        {"disks": [{"name": "root", "size": "2Gi"}]},
        {"disks": [{"name": "root", "size": "1Gi"}, {"name": "more", "size": "1Gi"}]},
        {"networks": [{"name": "eth0", "network": "other"}]},
        {"networks": [{"name": "eth0", "macAddress": "02:00:00:00:00:01"}]},
    ):
        changed = base.model_copy(
            update=VirtualMachineSpec.model_validate({**_dump(base), **judged}).__dict__
        )
        assert request_digest(changed) not in same, judged
    for free in ({"runStrategy": "Halted"}, {"paused": True}, {"terminationGracePeriodSeconds": 5}):
        changed = VirtualMachineSpec.model_validate({**_dump(base), **free})
        assert request_digest(changed) in same, free
    # The same size written another way is the same request.
    assert request_digest(spec(memory="1024Mi")) == request_digest(spec(memory="1Gi"))
    assert request_digest(spec(cpus=None, cpu={"cores": 1})) == request_digest(spec())


def test_the_record_round_trips_and_a_malformed_one_is_not_believed() -> None:
    record = admitted_of(spec(cpus=2, disks=[{"name": "d", "size": "1Gi"}]))
    assert record == Admitted(record.digest, 2, GI, GI)
    assert Admitted.decode(record.encode()) == record
    for bad in (None, "", "digest=x", "digest=x,cpus=two,memory=1,disk=0"):
        assert Admitted.decode(bad) is None


def test_a_change_is_held_until_its_digest_is_admitted() -> None:
    admitted = admitted_of(spec())
    assert not change_held({ADMITTED_ANNOTATION: admitted.encode()}, spec())
    assert change_held({ADMITTED_ANNOTATION: admitted.encode()}, spec(cpus=2))
    assert change_held({ADMITTED_ANNOTATION: "garbage"}, spec())
    assert not change_held({}, spec(cpus=2))  # bound before records: the controller records it at once


def _dump(model: VirtualMachineSpec) -> dict[str, object]:
    return model.model_dump(by_alias=True, exclude_none=True)
