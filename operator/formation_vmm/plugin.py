"""``kubectl vm``: start, stop, restart, pause, resume, console, list, top, snapshot, restore,
migrate, drain and uncordon.

Each verb patches the VM's spec (the API is the only interface; nothing here talks to a node
except ``console`` and ``top``, which ask the node's agent with the user's token) and waits for
the status to show the result, unless ``--no-wait``.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import (
    AGENT_ENDPOINT_ANNOTATION,
    API_VERSION,
    DRAIN_LABEL,
    DRAIN_TAINT,
    EVICTION_ANNOTATION,
    MIGRATION_KIND,
    MIGRATION_PLURAL,
    NODE_LABEL,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VM_PLURAL,
)
from formation_vmm.kube import ApiError, Kube, NotFoundError, kubeconfig_namespace, load_config
from formation_vmm.version import describe

Check = Callable[[VirtualMachine], bool]


class PluginError(RuntimeError):
    pass


class Vms:
    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None) -> None:
        load_config(kubeconfig or _default_kubeconfig(), context)
        self.namespace = namespace or kubeconfig_namespace(kubeconfig)
        self.kube = Kube()

    def get(self, name: str) -> VirtualMachine:
        try:
            return VirtualMachine.model_validate(self.kube.get(VM_PLURAL, self.namespace, name))
        except NotFoundError as exc:
            raise PluginError(f"virtualmachine {self.namespace}/{name} not found") from exc

    def list(self) -> list[VirtualMachine]:
        return [VirtualMachine.model_validate(item) for item in self.kube.list(VM_PLURAL, self.namespace)]

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.kube.patch(VM_PLURAL, self.namespace, name, {"spec": spec})

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> None:
        body = {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}
        try:
            self.kube.create(plural, self.namespace, body)
        except ApiError as exc:
            if exc.status in (409, 422):  # exists already, or refused by the schema: say why
                raise PluginError(f"{kind} {name}: {exc}") from exc
            raise

    def wait_done(self, plural: str, name: str, done: set[str], timeout: float) -> dict[str, Any]:
        """The object once its status.phase is one of ``done``."""
        deadline = time.monotonic() + timeout
        while True:
            raw = self.kube.get(plural, self.namespace, name)
            status = raw.get("status") or {}
            if status.get("phase") in done:
                return dict(raw)
            if time.monotonic() > deadline:
                note = f": {status['error']}" if status.get("error") else ""
                phase = status.get("phase") or "new"
                raise PluginError(f"timed out after {timeout:.0f}s waiting for {name}; it is {phase}{note}")
            time.sleep(0.3)

    def wait(self, name: str, check: Check, what: str, timeout: float) -> VirtualMachine:
        deadline = time.monotonic() + timeout
        while True:
            vm = self.get(name)
            if check(vm):
                return vm
            if time.monotonic() > deadline:
                raise PluginError(
                    f"timed out after {timeout:.0f}s waiting for {name} to be {what}; "
                    f"it is {vm.status.phase or 'new'}: {vm.status.message or ''}"
                )
            time.sleep(0.3)


def _phase(*phases: str) -> Check:
    return lambda vm: vm.status.phase in phases


def _restarted(since: datetime) -> Check:
    def check(vm: VirtualMachine) -> bool:
        done = vm.status.last_restart_requested_at
        return done is not None and done >= since and vm.status.phase in ("Running", "Paused")

    return check


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


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
        since = _now()
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
    return _table(rows)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def _endpoint(vms: Vms, vm: VirtualMachine) -> str:
    """Where the VM's node's agent answers. The controller writes it into the status (tenants
    cannot read Nodes); a VM bound before it did so is found through its Node."""
    if not vm.status.node_name:
        raise PluginError(f"{vm.metadata.name} is not bound to a node yet ({vm.status.phase or 'new'})")
    endpoint = vm.status.agent_endpoint
    if not endpoint:
        node = vms.kube.node(vm.status.node_name)
        endpoint = (node.get("metadata", {}).get("annotations") or {}).get(AGENT_ENDPOINT_ANNOTATION)
    if not endpoint:
        raise PluginError(
            f"node {vm.status.node_name} has no agent endpoint annotation; is its agent running?"
        )
    if not endpoint.startswith(("http://", "https://")):
        raise PluginError(f"agent endpoint {endpoint!r} is not an http(s) URL")
    return endpoint.rstrip("/")


def _open_agent(vms: Vms, url: str, node: str | None, timeout: float = 30) -> Any:
    """GET ``url`` from an agent with the user's bearer token: the agent asks the apiserver who
    that is and whether they may (agent/access.py)."""
    token = vms.kube.bearer_token()
    if token is None:
        raise PluginError(
            "the agent is asked with your bearer token, and your kubeconfig has none (a client "
            "certificate?): use a context with a token (OIDC, or kubectl create token)"
        )
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})  # noqa: S310
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) checked by _endpoint
    except urllib.error.HTTPError as exc:
        detail = exc.read(2048).decode(errors="replace").strip()
        raise PluginError(f"the agent on {node} refused: {detail or exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError) as exc:
        raise PluginError(f"cannot reach the agent on {node}: {exc}") from exc


def verb_console(vms: Vms, args: argparse.Namespace) -> str:
    """Print the console. Following it, a guest silent for ``--idle-reconnect`` seconds is no
    error: the read times out and the plugin asks again from the byte it got to (a quiet guest
    used to end ``kubectl vm console`` after 30 s with "broke off: timed out")."""
    vm = vms.get(args.name)
    follow = "false" if args.no_follow else "true"
    base = f"{_endpoint(vms, vm)}/vms/{vms.namespace}/{args.name}/console?follow={follow}"
    printed = 0
    while True:
        url = f"{base}&offset={printed}" if printed else base
        with _open_agent(vms, url, vm.status.node_name, args.idle_reconnect) as resp:
            try:
                while chunk := resp.read1(65536):
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
                    printed += len(chunk)
                return ""
            except TimeoutError as exc:
                if args.no_follow:
                    raise PluginError(f"the console of {args.name} broke off: {exc}") from exc
            except OSError as exc:
                raise PluginError(f"the console of {args.name} broke off: {exc}") from exc


def top_rows(before: dict[str, Any], after: dict[str, Any], seconds: float) -> list[list[str]]:
    """``kubectl vm top``'s table from two samples ``seconds`` apart (VM name -> counters, as
    the agents serve them): CPU as a share of one vCPU, memory now, rates of disk and network."""

    def rate(name: str, key: str) -> float:
        return max(float(after[name][key]) - float(before[name][key]), 0.0) / seconds

    rows = [["NAME", "CPU", "MEMORY", "DISK-READ", "DISK-WRITE", "NET-RX", "NET-TX"]]
    for name in sorted(set(before) & set(after)):
        rows.append(
            [
                name,
                f"{100 * rate(name, 'cpuSeconds'):.1f}%",
                _bytes(float(after[name]["memoryResidentBytes"])),
                _bytes(rate(name, "diskReadBytes")) + "/s",
                _bytes(rate(name, "diskWriteBytes")) + "/s",
                _bytes(rate(name, "networkReceiveBytes")) + "/s",
                _bytes(rate(name, "networkTransmitBytes")) + "/s",
            ]
        )
    return rows


def _bytes(value: float) -> str:
    for unit in ("", "Ki", "Mi", "Gi"):
        if value < 1024 or unit == "Gi":
            return f"{value:.0f}{unit}" if unit == "" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}Gi"


def verb_top(vms: Vms, args: argparse.Namespace) -> str:
    targets = [vms.get(args.name)] if args.name else [vm for vm in vms.list() if vm.status.node_name]
    if not targets:
        raise PluginError(f"no VM of namespace {vms.namespace} is on a node")
    wanted = {vm.metadata.name for vm in targets}
    endpoints = {_endpoint(vms, vm): vm.status.node_name for vm in targets}

    def sample() -> tuple[float, dict[str, Any]]:
        counters: dict[str, Any] = {}
        for endpoint, node in endpoints.items():
            with _open_agent(vms, f"{endpoint}/namespaces/{vms.namespace}/vmstats", node) as resp:
                counters |= {v["name"]: v for v in json.load(resp)["vms"] if v["name"] in wanted}
        return time.monotonic(), counters

    first_at, first = sample()
    time.sleep(args.interval)
    second_at, second = sample()
    rows = top_rows(first, second, max(second_at - first_at, 1e-3))
    if len(rows) == 1:
        raise PluginError("no running VM to show: a stopped VM has no counters")
    return _table(rows)


def _stamp() -> str:
    return _now().strftime("%Y%m%d-%H%M%S")


def verb_snapshot(vms: Vms, args: argparse.Namespace) -> str:
    vms.get(args.name)  # a clear error for a VM that does not exist
    name = args.snapshot or f"{args.name}-{_stamp()}"
    vms.create(SNAPSHOT_PLURAL, SNAPSHOT_KIND, name, {"vmName": args.name, "includeMemory": args.memory})
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
    name = f"{args.name}-restore-{_stamp()}"
    vms.create(RESTORE_PLURAL, RESTORE_KIND, name, {"vmName": args.name, "snapshotName": args.snapshot})
    if args.no_wait:
        return f"vmrestore/{name} requested"
    restore = vms.wait_done(RESTORE_PLURAL, name, {"Succeeded", "Failed"}, args.timeout)
    status = restore["status"]
    if status["phase"] == "Failed":
        raise PluginError(f"vmrestore/{name} failed: {status.get('error', '')}")
    return f"vmrestore/{name} Succeeded: {args.name} is back at {args.snapshot}"


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
    name = f"{args.name}-migration-{_stamp()}"
    spec: dict[str, Any] = {"vmName": args.name}
    if args.to:
        spec["targetNode"] = args.to
    vms.create(MIGRATION_PLURAL, MIGRATION_KIND, name, spec)
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
        said = (body["metadata"].get("annotations") or {}).get(EVICTION_ANNOTATION)
        if said:
            lines.append(f"{name}: {said}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl vm", description=__doc__)
    parser.add_argument("--version", action="version", version=describe())
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context")
    parser.add_argument("-n", "--namespace", help="namespace (default: the context's, else default)")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb, text in (
        ("start", "run the VM (sets runStrategy: Always)"),
        ("stop", "stop the VM: ACPI shutdown, hard stop after its grace period (runStrategy: Halted)"),
        ("restart", "reboot the VM (sets restartRequestedAt), applying a changed spec"),
        ("pause", "suspend the VM's CPUs"),
        ("resume", "resume a paused VM"),
    ):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("name")
        cmd.add_argument("--no-wait", action="store_true", help="return once the change is requested")
        cmd.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")
        cmd.set_defaults(run=verb_change)
    console = sub.add_parser("console", help="print the VM's serial console, following it")
    console.add_argument("name")
    console.add_argument("--no-follow", action="store_true", help="print what is there and exit")
    console.add_argument(
        "--idle-reconnect",
        type=float,
        default=30.0,
        help="following, ask the agent again after this many seconds without output (default 30)",
    )
    console.set_defaults(run=verb_console)
    sub.add_parser("list", help="the VMs of the namespace").set_defaults(run=verb_list)
    top = sub.add_parser("top", help="CPU, memory, disk and network of running VMs, from their agents")
    top.add_argument("name", nargs="?", help="one VM (default: every VM of the namespace)")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between the two samples")
    top.set_defaults(run=verb_top)
    snapshot = sub.add_parser("snapshot", help="snapshot the VM's disks (a VmSnapshot), and wait until Ready")
    snapshot.add_argument("name")
    snapshot.add_argument("snapshot", nargs="?", help="snapshot name (default: <vm>-<time>)")
    snapshot.add_argument("--memory", action="store_true", help="also save a running VM's memory")
    restore = sub.add_parser("restore", help="bring the VM's disks back to a snapshot (a VmRestore)")
    restore.add_argument("name")
    restore.add_argument("snapshot")
    migrate = sub.add_parser(
        "migrate", help="move the running VM to another node (a VmMigration), following it"
    )
    migrate.add_argument("name")
    migrate.add_argument("--to", metavar="NODE", help="the target node (default: the controller picks one)")
    migrate.add_argument("--cancel", action="store_true", help="cancel the VM's migration under way")
    drain = sub.add_parser("drain", help="move every VM off a node per its evictionStrategy (cluster admins)")
    drain.add_argument("node")
    uncordon = sub.add_parser("uncordon", help="end a node's drain: it takes VMs again")
    uncordon.add_argument("node")
    uncordon.set_defaults(run=verb_uncordon)
    for cmd, run in (
        (snapshot, verb_snapshot),
        (restore, verb_restore),
        (migrate, verb_migrate),
        (drain, verb_drain),
    ):
        cmd.add_argument("--no-wait", action="store_true", help="return once it is requested")
        cmd.add_argument("--timeout", type=float, default=300.0, help="seconds to wait (default 300)")
        cmd.set_defaults(run=run)
    return parser


def _default_kubeconfig() -> str | None:
    """$KUBECONFIG's first file, else kubectl's default; None lets a pod use its token."""
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    return path if os.path.exists(path) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        vms = Vms(args.kubeconfig, args.context, args.namespace)
        out = args.run(vms, args)
    except (PluginError, ApiError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
