"""kopf handlers of the agent. Thin: parse, reconcile, patch status, post events."""

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client

from formation_vmm.agent.hypervisor import Hypervisor, HypervisorError
from formation_vmm.agent.reconcile import Reconciler
from formation_vmm.agent.status import status_after
from formation_vmm.api.conditions import set_condition
from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import (
    AGENT_FINALIZER,
    AGENT_PREFIX,
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    GROUP,
    HEARTBEAT_ANNOTATION,
    NODE_LABEL,
    VERSION,
    VM_PLURAL,
)
from formation_vmm.api.quantity import format_mebibytes, parse_quantity
from formation_vmm.config import Settings
from formation_vmm.domain.build import UnsupportedSpecError
from formation_vmm.domain.naming import UnsafeNameError
from formation_vmm.kube import StatusWriter, annotate_node

log = logging.getLogger(__name__)

# How long to wait before retrying after libvirt failed.
HYPERVISOR_RETRY_SECONDS = 10.0


@dataclass
class AgentMemo:
    settings: Settings
    node: str
    hypervisor: Hypervisor
    reconciler: Reconciler
    api: client.CoreV1Api
    status: StatusWriter
    heartbeat: asyncio.Task[None] | None = None


def publish_node(memo: AgentMemo) -> None:
    """Write this node's capacity (less the reserve) and a heartbeat on its Node object."""
    cpus, memory = memo.hypervisor.capacity()
    settings = memo.settings
    annotate_node(
        memo.api,
        memo.node,
        {
            CAPACITY_CPUS_ANNOTATION: str(max(cpus - settings.reserved_cpus, 0)),
            CAPACITY_MEMORY_ANNOTATION: format_mebibytes(
                max(memory - parse_quantity(settings.reserved_memory), 0)
            ),
            HEARTBEAT_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
    )


async def _heartbeat(memo: AgentMemo) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(None, publish_node, memo)
        except Exception:
            log.exception("cannot publish the heartbeat of node %s", memo.node)
        await asyncio.sleep(memo.settings.heartbeat_seconds)


def register(registry: kopf.OperatorRegistry, node: str) -> None:
    mine = {NODE_LABEL: node}

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.finalizer = AGENT_FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=AGENT_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=AGENT_PREFIX, key="last-handled-configuration"
        )
        state: AgentMemo = memo.state
        await asyncio.get_running_loop().run_in_executor(None, publish_node, state)
        state.heartbeat = asyncio.create_task(_heartbeat(state))

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        if state.heartbeat is not None:
            state.heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await state.heartbeat
        state.hypervisor.close()

    @kopf.on.create(GROUP, VERSION, VM_PLURAL, labels=mine, id="reconcile", registry=registry)
    @kopf.on.resume(GROUP, VERSION, VM_PLURAL, labels=mine, id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, VM_PLURAL, labels=mine, id="reconcile", registry=registry)
    def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        vm = VirtualMachine.model_validate(dict(body))
        raw = dict(body)
        old_phase = vm.status.phase
        try:
            outcome = state.reconciler.reconcile(vm)
        except (UnsupportedSpecError, UnsafeNameError) as exc:
            _fail(state, body, vm, "InvalidSpec", str(exc))
            raise kopf.PermanentError(str(exc)) from exc
        except HypervisorError as exc:
            _fail(state, body, vm, "HypervisorError", str(exc))
            raise kopf.TemporaryError(str(exc), delay=HYPERVISOR_RETRY_SECONDS) from exc
        new = state.status.write(
            raw, lambda st: status_after(vm, st, outcome.actions, outcome.domain, state.node)
        )
        if new["phase"] != old_phase:
            kopf.info(
                body, reason=new["phase"], message=f"{old_phase or 'new'} -> {new['phase']} on {state.node}"
            )

    @kopf.on.delete(GROUP, VERSION, VM_PLURAL, labels=mine, id="teardown", registry=registry)
    def teardown(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        state: AgentMemo = memo.state
        vm = VirtualMachine.model_validate(dict(body))
        try:
            state.reconciler.reconcile(
                vm, deleting=True, grace_seconds=vm.spec.termination_grace_period_seconds
            )
        except HypervisorError as exc:
            raise kopf.TemporaryError(str(exc), delay=HYPERVISOR_RETRY_SECONDS) from exc


def _fail(state: "AgentMemo", body: kopf.Body, vm: VirtualMachine, reason: str, message: str) -> None:
    if vm.status.message == message and vm.status.phase == "Failed":
        return  # said already: no second write, no second event
    state.status.write(
        dict(body),
        lambda st: {
            "phase": "Failed",
            "message": message,
            "conditions": set_condition(
                st.get("conditions"), "Ready", False, reason, message, vm.metadata.generation
            ),
        },
    )
    kopf.warn(body, reason=reason, message=message)
