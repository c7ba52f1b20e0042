"""kopf handlers of the controller. Thin: parse, ask placement, patch status, post events."""

import threading
from dataclasses import dataclass, field
from typing import Any

import kopf

from formation_vmm.api.conditions import get_condition, set_condition
from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import GROUP, HYPERVISOR_LABEL, NODE_LABEL, VERSION, VM_PLURAL
from formation_vmm.config import Settings
from formation_vmm.controller.nodes import node_info
from formation_vmm.kube import StatusWriter, node_summary
from formation_vmm.placement import Load, Request, place

# How long a VM that fits nowhere waits before placement is tried again.
UNSCHEDULABLE_RETRY_SECONDS = 5.0


@dataclass
class ControllerMemo:
    settings: Settings
    status: StatusWriter
    # Serialises placement so that two VMs placed at once do not both take the last free slot.
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Bindings made but not yet seen through the VM index: uid -> (node, vcpus, memory).
    assumed: dict[str, tuple[str, int, int]] = field(default_factory=dict)


def _loads(
    vm_index: kopf.Index[str, tuple[str, int, int]], assumed: dict[str, tuple[str, int, int]]
) -> dict[str, Load]:
    seen: dict[str, tuple[str, int, int]] = dict(assumed)
    for node, entries in vm_index.items():
        for uid, vcpus, memory in entries:
            seen[uid] = (node, vcpus, memory)
    loads: dict[str, Load] = {}
    for node, vcpus, memory in seen.values():
        cur = loads.get(node, Load())
        loads[node] = Load(cur.vcpus + vcpus, cur.memory + memory)
    return loads


def register(registry: kopf.OperatorRegistry) -> None:
    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        from formation_vmm.api.names import CONTROLLER_FINALIZER, CONTROLLER_PREFIX

        settings.persistence.finalizer = CONTROLLER_FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=CONTROLLER_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=CONTROLLER_PREFIX, key="last-handled-configuration"
        )

    @kopf.index(
        "", "v1", "nodes", labels={HYPERVISOR_LABEL: "true"}, id="hypervisor_nodes", registry=registry
    )
    def hypervisor_nodes(body: kopf.Body, **_: Any) -> dict[str, dict[str, Any]]:
        return {"nodes": node_summary(dict(body))}

    @kopf.index(
        GROUP, VERSION, VM_PLURAL, labels={NODE_LABEL: kopf.PRESENT}, id="bound_vms", registry=registry
    )
    def bound_vms(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, tuple[str, int, int]]:
        vm = VirtualMachine.model_validate(dict(body))
        return {labels[NODE_LABEL]: (vm.metadata.uid or "", vm.spec.vcpus, vm.spec.memory_bytes)}

    @kopf.on.create(GROUP, VERSION, VM_PLURAL, id="bind", registry=registry)
    @kopf.on.resume(GROUP, VERSION, VM_PLURAL, id="bind", registry=registry)
    @kopf.on.update(GROUP, VERSION, VM_PLURAL, id="bind", registry=registry)
    def bind(
        body: kopf.Body,
        patch: kopf.Patch,
        memo: kopf.Memo,
        **kwargs: Any,
    ) -> None:
        # kopf passes each index as a keyword named after it.
        hypervisor_nodes: kopf.Index[str, dict[str, Any]] = kwargs["hypervisor_nodes"]
        bound_vms: kopf.Index[str, tuple[str, int, int]] = kwargs["bound_vms"]
        state: ControllerMemo = memo.state
        raw = dict(body)
        vm = VirtualMachine.model_validate(raw)
        gen = vm.metadata.generation
        bound = vm.metadata.labels.get(NODE_LABEL)
        if bound:
            # The label is the binding of record; status follows it (a restart between the
            # status write and the label leaves the status ahead, never behind, and this repairs
            # whatever is missing).
            if vm.status.node_name != bound or vm.status.vcpus != vm.spec.vcpus:
                state.status.write(raw, lambda _st: {"nodeName": bound, "vcpus": vm.spec.vcpus})
            return
        with state.lock:
            nodes = [
                node_info(summary, state.settings.node_lost_seconds)
                for summary in hypervisor_nodes.get("nodes", [])
            ]
            request = Request(
                vcpus=vm.spec.vcpus,
                memory=vm.spec.memory_bytes,
                node_selector=vm.spec.node_selector,
                tolerations=tuple(vm.spec.tolerations),
            )
            decision = place(
                request,
                nodes,
                _loads(bound_vms, state.assumed),
                state.settings.cpu_overcommit,
                state.settings.memory_overcommit,
            )
            if decision.node is not None:
                state.assumed[vm.metadata.uid or ""] = (decision.node, request.vcpus, request.memory)
        if decision.node is None:
            message = decision.message
            old = get_condition(vm.status.to_api().get("conditions"), "Scheduled")
            if old is None or old.get("message") != message:
                state.status.write(
                    raw,
                    lambda st: {
                        "phase": "Pending",
                        "vcpus": vm.spec.vcpus,
                        "message": message,
                        "conditions": set_condition(
                            st.get("conditions"), "Scheduled", False, "Unschedulable", message, gen
                        ),
                    },
                )
                kopf.warn(body, reason="Unschedulable", message=message)
            raise kopf.TemporaryError(message, delay=UNSCHEDULABLE_RETRY_SECONDS)
        node = decision.node
        # Status first, label second: the agent acts only once the label is there, and by then
        # the Scheduled condition it must keep is already in the status it reads.
        state.status.write(
            raw,
            lambda st: {
                "phase": "Scheduled",
                "nodeName": node,
                "vcpus": vm.spec.vcpus,
                "message": f"scheduled on {node}",
                "conditions": set_condition(
                    st.get("conditions"), "Scheduled", True, "Scheduled", decision.message, gen
                ),
            },
        )
        patch.metadata.labels[NODE_LABEL] = node
        kopf.info(body, reason="Scheduled", message=f"bound to node {node}")

    @kopf.on.delete(GROUP, VERSION, VM_PLURAL, optional=True, id="forget", registry=registry)
    def forget(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo.state.assumed.pop(body.metadata.uid or "", None)
