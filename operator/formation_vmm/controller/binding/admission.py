"""Whether a change of a bound VM's spec may be applied: the checks a new VM meets (its
namespace's quota, room on its node, networks its namespace may use) applied to what the change
adds. Pure; the binder gathers the figures and writes the outcome (docs/security.md)."""

from dataclasses import dataclass

from formation_vmm.placement import Load, NodeInfo, Request, room_refusal
from formation_vmm.quota import Quota, Usage, refusal


@dataclass(frozen=True)
class Refusal:
    reason: str  # QuotaExceeded, InsufficientRoom, NetworkNotFound, NetworkNotAllowed, ...
    message: str


def change_refusal(
    request: Request,
    admitted: Load,
    node: NodeInfo | None,
    node_load: Load,
    quotas: list[Quota],
    namespace_usage: Usage,
    cpu_ratio: float,
    mem_ratio: float,
) -> Refusal | None:
    """Why a VM that was admitted with ``admitted`` may not change to ``request``, or None.
    ``node_load`` and ``namespace_usage`` include the VM as admitted: its share is taken out
    before the new one is counted; a VM that shrinks, or keeps its size, always may. (Its
    networks are judged by the binder's network catalog, as a new VM's are.)"""
    grows = request.vcpus > admitted.vcpus or request.memory > admitted.memory or request.disk > admitted.disk
    if not grows:
        return None  # what a VM has, it keeps: an admin's lower quota binds new asks only
    wanted = Usage(request.vcpus, request.memory, request.disk)
    held = Usage(admitted.vcpus, admitted.memory, admitted.disk)
    if quotas:
        over = refusal(quotas, namespace_usage - held, wanted)
        if over is not None:
            return Refusal("QuotaExceeded", over)
    if node is None:
        return Refusal("InsufficientRoom", "its node is not known to the controller")
    room = room_refusal(node, request, node_load - admitted, cpu_ratio, mem_ratio)
    if room is not None:
        return Refusal("InsufficientRoom", room)
    return None
