"""What a node offers is bounded by what someone other than its agent vouches for (issue 26,
finding 9): a compromised agent that claims a huge host draws no more VMs (nor their sealed
Secrets) than its kubelet's status.allocatable allows. The claim is written here, every second,
as such an agent would write it on its own Node (tests/support/agentless.py)."""

import pytest

from formation_vmm.api.names import NODE_LABEL
from tests.support.agentless import beating
from tests.support.fleet import Fleet, condition

pytestmark = pytest.mark.controlplane

CLAIMING = "node-claims"
TOLERATES = [{"key": "dedicated", "operator": "Equal", "value": "claims", "effect": "NoSchedule"}]


def test_a_node_claiming_more_than_its_kubelet_vouches_for_gets_no_more(fleet: Fleet, ns: str) -> None:
    # The "agent" claims a thousand CPUs and ten tebibytes; its kubelet vouches for 2 and 1Gi.
    stop, beater = beating(
        fleet, (CLAIMING,), {"zone": "claims"}, "claims", "1000", "10Ti", {"cpu": "2", "memory": "1Gi"}
    )
    try:
        where = {"nodeSelector": {"zone": "claims"}, "tolerations": TOLERATES}
        fleet.apply_vm(ns, "fits", cpus=2, memory="512Mi", **where)
        fleet.apply_vm(ns, "greedy", cpus=3, memory="64Mi", **where)
        fleet.wait_vm(
            ns, "fits", lambda vm: vm["metadata"].get("labels", {}).get(NODE_LABEL) == CLAIMING, "bound"
        )
        vm = fleet.wait_vm(
            ns, "greedy", lambda v: condition(v, "Scheduled").get("reason") == "Unschedulable", "refused"
        )
        assert "1 have too few free vCPUs" in condition(vm, "Scheduled")["message"]
    finally:
        stop.set()
        beater.join()
        # No agent runs there to let the VM go: its finalizer goes by hand.
        unfinalize = '{"metadata": {"finalizers": null}}'
        fleet.kubectl("patch", "vm", "fits", "-n", ns, "--type=merge", "-p", unfinalize, check=False)
        fleet.kubectl("delete", "node", CLAIMING, check=False)
