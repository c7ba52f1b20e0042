"""``vmm``: run the controller or the agent, or a local cluster (``vmm dev up|down|status``)."""

import argparse
import faulthandler
import signal
import sys
from pathlib import Path
from typing import Any

from formation_vmm import config
from formation_vmm.version import describe


def _operator_flags(parser: argparse.ArgumentParser) -> None:
    # Every flag defaults to None so that an absent flag leaves the env or file value in force.
    parser.add_argument("--config", dest="config_path", type=Path, help="YAML config file (VMM_CONFIG_PATH)")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="VMM_LOG_LEVEL")
    parser.add_argument("--api-port", type=int, help="health and metrics port (VMM_API_PORT, default 3003)")
    parser.add_argument("--namespace", dest="namespaces", action="append", help="watch only this namespace")


def _agent_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--node-name", help="this node's name (VMM_NODE_NAME)")
    parser.add_argument("--libvirt-uri", help="libvirt URI (VMM_LIBVIRT_URI, default qemu:///system)")
    parser.add_argument("--domain-type", choices=["kvm", "qemu", "test"], help="VMM_DOMAIN_TYPE")
    parser.add_argument("--vm-dir", type=Path, help="runtime files (VMM_VM_DIR)")
    parser.add_argument("--disks-dir", type=Path, help="VM disks (VMM_DISKS_DIR)")
    parser.add_argument("--images-dir", type=Path, help="image cache (VMM_IMAGES_DIR)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 16:
        raise argparse.ArgumentTypeError(f"between 1 and 16, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmm", description=__doc__)
    parser.add_argument("--version", action="version", version=describe())
    sub = parser.add_subparsers(dest="command", required=True)
    controller = sub.add_parser("controller", help="run the cluster controller (placement, node health)")
    _operator_flags(controller)
    agent = sub.add_parser("agent", help="run the node agent (libvirt domains, disks, status)")
    _operator_flags(agent)
    _agent_flags(agent)
    dev = sub.add_parser("dev", help="a local cluster on this machine")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    up = dev_sub.add_parser("up", help="start control plane, controller and agent; apply a sample VM")
    up.add_argument("--no-sample", action="store_true", help="do not apply the sample VM")
    up.add_argument(
        "--kubelet",
        action="store_true",
        help="a real kubelet node, and the chart installed on it by helm from the image built here",
    )
    up.add_argument(
        "--nodes",
        type=_positive,
        default=1,
        help="hypervisor nodes, each with its own libvirtd and agent (default 1; not with --kubelet)",
    )
    dev_sub.add_parser("down", help="delete the VMs and stop everything `up` started")
    dev_sub.add_parser("status", help="say what runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    # `kill -USR1 <pid>` prints every thread's stack to the log: how to see what a stuck agent waits on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = build_parser().parse_args(argv)
    flags: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("command", "dev_command")}
    if args.command == "controller":
        from formation_vmm.run import run_controller

        run_controller(config.load(flags))
    elif args.command == "agent":
        from formation_vmm.run import run_agent

        run_agent(config.load(flags))
    elif args.command == "dev":
        from formation_vmm.devcluster import local

        if args.dev_command == "up":
            if args.kubelet and args.nodes != 1:
                build_parser().error("--kubelet makes one node; --nodes is for the process cluster")
            return local.up(sample=not args.no_sample, kubelet=args.kubelet, nodes=args.nodes)
        if args.dev_command == "down":
            return local.down()
        return local.status()
    return 0


if __name__ == "__main__":
    sys.exit(main())
