"""``kubectl vm``: start, stop, restart, pause, resume, console, list, top, snapshot, restore,
migrate, drain and uncordon.

Each verb patches the VM's spec (the API is the only interface; nothing here talks to a node
except ``console`` and ``top``, which ask the node's agent with the user's token) and waits for
the status to show the result, unless ``--no-wait``.
"""

import argparse
import sys

from formation_vmm.kube import ApiError
from formation_vmm.plugin.agents import top_rows, verb_console, verb_top
from formation_vmm.plugin.client import PluginError, Vms
from formation_vmm.plugin.lifecycle import verb_change, verb_list, verb_restore, verb_snapshot
from formation_vmm.plugin.moves import verb_drain, verb_migrate, verb_uncordon
from formation_vmm.version import describe

__all__ = ["main", "top_rows"]


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
