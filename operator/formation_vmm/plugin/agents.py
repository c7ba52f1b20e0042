"""console and top: asked of the VM's node's agent, with the user's own token."""

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import (
    AGENT_ENDPOINT_ANNOTATION,
)
from formation_vmm.plugin.client import PluginError, Vms, table


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
    return table(rows)
