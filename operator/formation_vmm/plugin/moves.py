"""migrate, drain and uncordon: a VM moved live to another node, a node's VMs moved away."""

import argparse
import sys
import time
from typing import Any

from formation_vmm.api.names import (
    DRAIN_LABEL,
    DRAIN_TAINT,
    EVICTION_ANNOTATION,
    MIGRATION_KIND,
    MIGRATION_PLURAL,
    NODE_LABEL,
    RESTART_ELSEWHERE_ANNOTATION,
    VM_PLURAL,
)
from formation_vmm.kube import ApiError, NotFoundError
from formation_vmm.plugin.client import PluginError, Vms, stamp

MIGRATION_DONE = {"Succeeded", "Failed", "Cancelled"}


def verb_migrate(vms: Vms, args: argparse.Namespace) -> str:
    """Create a VmMigration and follow it, a line per change of phase or progress; with
    ``--cancel``, delete the VM's unfinished migrations (the VM stays where it runs)."""
    vm = vms.get(args.name)
    if args.cancel:
        active = [
            m["metadata"]["name"]
            for m in vms.kube.list(MIGRATION_PLURAL, vms.namespace)
            if (m.get("spec") or {}).get("vmName") == args.name
            and (m.get("status") or {}).get("phase") not in MIGRATION_DONE
        ]
        if not active:
            raise PluginError(f"no migration of {args.name} is under way")
        for name in active:
            vms.kube.delete(MIGRATION_PLURAL, vms.namespace, name)
        return f"vmmigration/{', '.join(active)} cancelled: {args.name} stays on {vm.status.node_name}"
    spec: dict[str, Any] = {"vmName": args.name}
    if args.to:
        spec["targetNode"] = args.to
    name = vms.create(MIGRATION_PLURAL, MIGRATION_KIND, spec, prefix=f"{args.name}-migration-{stamp()}-")
    if args.no_wait:
        return f"vmmigration/{name} requested"
    deadline = time.monotonic() + args.timeout
    said = ""
    while True:
        status = vms.kube.get(MIGRATION_PLURAL, vms.namespace, name).get("status") or {}
        line = _migration_line(status)
        if line != said:
            print(f"vmmigration/{name}: {line}", file=sys.stderr, flush=True)
            said = line
        if status.get("phase") in MIGRATION_DONE:
            break
        if time.monotonic() > deadline:
            raise PluginError(f"timed out after {args.timeout:.0f}s; vmmigration/{name} is {line}")
        time.sleep(0.3)
    if status["phase"] != "Succeeded":
        raise PluginError(
            f"vmmigration/{name} {status['phase']} ({status.get('reason', '')}): {status.get('message', '')}"
        )
    downtime = (status.get("progress") or {}).get("downtimeMilliseconds")
    paused = f", paused {downtime} ms" if downtime is not None else ""
    return f"vmmigration/{name} Succeeded: {args.name} runs on {status.get('targetNode')}{paused}"


def _migration_line(status: dict[str, Any]) -> str:
    phase = status.get("phase") or "new"
    progress = (status.get("progress") or {}).get("summary")
    where = f" {status.get('sourceNode')} -> {status.get('targetNode')}" if status.get("targetNode") else ""
    detail = progress if phase == "Migrating" and progress else status.get("message")
    return f"{phase}{where}" + (f": {detail}" if detail else "")


def _set_drain_taint(vms: Vms, node: str, on: bool) -> None:
    """Add or remove the drain taint, at the Node's version read (a merge patch replaces the
    whole list: another writer's taint must not be lost)."""
    for _ in range(10):
        try:
            body = vms.kube.node(node)
        except NotFoundError as exc:
            raise PluginError(f"node {node} not found") from exc
        taints = [t for t in (body.get("spec") or {}).get("taints") or [] if t.get("key") != DRAIN_TAINT]
        if on:
            taints.append({"key": DRAIN_TAINT, "effect": "NoSchedule"})
        patch = {
            "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
            "spec": {"taints": taints},
        }
        try:
            vms.kube.patch_node(node, patch)
            return
        except ApiError as exc:
            if exc.status != 409:
                raise
    raise PluginError(f"node {node} kept changing; try again")


def drain_report(vm_bodies: list[dict[str, Any]], migrations: list[dict[str, Any]]) -> tuple[list[str], bool]:
    """The drain's state: a line per VM still on the node, and whether any still moves."""
    phases = {
        (m.get("spec") or {}).get("vmName"): (m.get("status") or {}).get("phase") or "new" for m in migrations
    }
    lines, moving = [], False
    for body in sorted(vm_bodies, key=lambda b: b["metadata"]["name"]):
        name = body["metadata"]["name"]
        annotations = body["metadata"].get("annotations") or {}
        said = annotations.get(EVICTION_ANNOTATION)
        if said:
            lines.append(f"{name}: {said}")
        elif annotations.get(RESTART_ELSEWHERE_ANNOTATION):
            moving = True
            phase = (body.get("status") or {}).get("phase") or "stopping"
            lines.append(f"{name}: to be started on another node ({phase} here)")
        else:
            moving = True
            lines.append(f"{name}: {phases.get(name, 'waiting for the controller')}")
    return lines, moving


def verb_drain(vms: Vms, args: argparse.Namespace) -> str:
    """Taint the node for a drain, then follow the VMs away: every namespace's, so it takes a
    cluster admin. Ends when no VM of the node moves any more; the ones that stay say why."""
    _set_drain_taint(vms, args.node, True)
    if args.no_wait:
        return f"node/{args.node} draining"
    deadline = time.monotonic() + args.timeout
    said: list[str] = []
    while True:
        bodies = vms.kube.list(VM_PLURAL, None, label_selector=f"{NODE_LABEL}={args.node}")
        migrations = vms.kube.list(MIGRATION_PLURAL, None, label_selector=f"{DRAIN_LABEL}={args.node}")
        lines, moving = drain_report(bodies, migrations)
        if lines != said:
            print(f"node/{args.node}: {len(lines)} VM(s) on the node", file=sys.stderr, flush=True)
            for line in lines:
                print(f"  {line}", file=sys.stderr, flush=True)
            said = lines
        if not moving:
            break
        if time.monotonic() > deadline:
            raise PluginError(f"timed out after {args.timeout:.0f}s; node/{args.node} still drains")
        time.sleep(0.5)
    blocking = [line for line in said if "blocks the drain" in line]
    if blocking:
        raise PluginError(
            f"node/{args.node} drained but for {len(blocking)} VM(s) that block it: " + "; ".join(blocking)
        )
    staying = f"; {len(said)} stay (see above)" if said else ""
    return f"node/{args.node} drained{staying}"


def verb_uncordon(vms: Vms, args: argparse.Namespace) -> str:
    _set_drain_taint(vms, args.node, False)
    return f"node/{args.node} uncordoned: it takes VMs again"
