"""start, stop, restart, pause, resume, list, snapshot, restore: each patches the VM's spec or
creates an object, and waits for the status to show the result."""

import argparse
from datetime import datetime, timedelta
from typing import Any

from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import (
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
)
from formation_vmm.plugin.client import Check, PluginError, Vms, stamp, table, utc_now


def _phase(*phases: str) -> Check:
    return lambda vm: vm.status.phase in phases


def _restarted(since: datetime) -> Check:
    def check(vm: VirtualMachine) -> bool:
        done = vm.status.last_restart_requested_at
        return done is not None and done >= since and vm.status.phase in ("Running", "Paused")

    return check


def _next_restart_stamp(vm: VirtualMachine, now: datetime) -> datetime:
    """Now, unless the last request is as new or newer: then a second after it. The agent restarts
    only for a stamp newer than the last one it handled, and a stamp is to the second, so a restart
    asked twice in one second (or after a client whose clock runs ahead) would otherwise be no
    change at all, and the wait would see the earlier restart as this one."""
    asked = vm.spec.restart_requested_at
    if asked is not None and asked >= now:
        return asked.replace(microsecond=0) + timedelta(seconds=1)
    return now


def verb_change(vms: Vms, args: argparse.Namespace) -> str:
    """start, stop, restart, pause, resume: the patch, and the status that shows it took."""
    name = args.name
    vm = vms.get(name)
    if args.verb == "start":
        patch: dict[str, Any] = {"runStrategy": "Always"} if vm.spec.run_strategy != "Always" else {}
        check, what = _phase("Running", "Paused"), "running"
    elif args.verb == "stop":
        patch, check, what = {"runStrategy": "Halted"}, _phase("Stopped"), "stopped"
    elif args.verb == "restart":
        since = _next_restart_stamp(vm, utc_now())
        patch, check, what = (
            {"restartRequestedAt": since.strftime("%Y-%m-%dT%H:%M:%SZ")},
            _restarted(since),
            "restarted",
        )
    elif args.verb == "pause":
        patch, check, what = {"paused": True}, _phase("Paused"), "paused"
    else:
        patch, check, what = {"paused": False}, _phase("Running"), "running"
    if patch:
        vms.patch_spec(name, patch)
    if args.no_wait:
        return f"virtualmachine {vms.namespace}/{name}: {args.verb} requested"
    vm = vms.wait(name, check, what, args.timeout)
    return f"virtualmachine {vms.namespace}/{name} is {vm.status.phase}"


def verb_list(vms: Vms, _: argparse.Namespace) -> str:
    rows = [["NAME", "PHASE", "NODE", "IP", "CPUS", "MEMORY", "READY"]]
    for vm in vms.list():
        ready = next((c.status for c in vm.status.conditions if c.type == "Ready"), "")
        ip = next((i.ip_address for i in vm.status.interfaces if i.ip_address), "")
        rows.append(
            [
                vm.metadata.name,
                vm.status.phase or "",
                vm.status.node_name or "",
                ip or "",
                str(vm.spec.vcpus),
                vm.spec.memory,
                ready,
            ]
        )
    return table(rows)


def verb_snapshot(vms: Vms, args: argparse.Namespace) -> str:
    vms.get(args.name)  # a clear error for a VM that does not exist
    name = vms.create(
        SNAPSHOT_PLURAL,
        SNAPSHOT_KIND,
        {"vmName": args.name, "includeMemory": args.memory},
        name=args.snapshot or "",
        prefix=f"{args.name}-{stamp()}-",
    )
    if args.no_wait:
        return f"vmsnapshot/{name} requested"
    snap = vms.wait_done(SNAPSHOT_PLURAL, name, {"Ready", "Failed"}, args.timeout)
    status = snap["status"]
    if status["phase"] == "Failed":
        raise PluginError(f"vmsnapshot/{name} failed: {status.get('error', '')}")
    memory = ", memory included" if status.get("memory") else ""
    return f"vmsnapshot/{name} Ready on {status.get('nodeName')}: {status.get('size')} bytes{memory}"


def verb_restore(vms: Vms, args: argparse.Namespace) -> str:
    vms.get(args.name)
    spec = {"vmName": args.name, "snapshotName": args.snapshot}
    name = vms.create(RESTORE_PLURAL, RESTORE_KIND, spec, prefix=f"{args.name}-restore-{stamp()}-")
    if args.no_wait:
        return f"vmrestore/{name} requested"
    restore = vms.wait_done(RESTORE_PLURAL, name, {"Succeeded", "Failed"}, args.timeout)
    status = restore["status"]
    if status["phase"] == "Failed":
        raise PluginError(f"vmrestore/{name} failed: {status.get('error', '')}")
    return f"vmrestore/{name} Succeeded: {args.name} is back at {args.snapshot}"
