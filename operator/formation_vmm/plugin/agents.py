"""console and top: asked of the apiserver, as subresources of the VM in our aggregated API
(controller/serving/subresources.py). The apiserver authenticates the user however the kubeconfig says
(token, client certificate, exec plugin) and authorises ``get`` on ``virtualmachines/console``
or ``virtualmachines/stats``; no credential of the user goes anywhere else."""

import argparse
import json
import sys
import time
from typing import Any

import urllib3

from formation_vmm.api.names import SUBRESOURCES_GROUP, SUBRESOURCES_VERSION, VM_PLURAL
from formation_vmm.kube import ApiError
from formation_vmm.plugin.client import PluginError, Vms, table


def _path(vms: Vms, name: str, subresource: str) -> str:
    return (
        f"/apis/{SUBRESOURCES_GROUP}/{SUBRESOURCES_VERSION}/namespaces/{vms.namespace}"
        f"/{VM_PLURAL}/{name}/{subresource}"
    )


def _open(vms: Vms, name: str, subresource: str, query: dict[str, str], timeout: float) -> Any:
    try:
        return vms.kube.stream(_path(vms, name, subresource), query, timeout)
    except ApiError as exc:
        if exc.status == 404 and "the server could not find the requested resource" in str(exc):
            raise PluginError(
                "the cluster does not serve VM consoles and counters: is the APIService "
                f"{SUBRESOURCES_VERSION}.{SUBRESOURCES_GROUP} installed and Available?"
            ) from exc
        if exc.status == 503:
            raise PluginError(
                f"{subresource} of {name}: {exc} (the apiserver cannot reach the controller's "
                f"aggregated API: kubectl get apiservice {SUBRESOURCES_VERSION}.{SUBRESOURCES_GROUP})"
            ) from exc
        raise PluginError(f"{subresource} of {name}: {exc}") from exc


def verb_console(vms: Vms, args: argparse.Namespace) -> str:
    """Print the console. Following it, the server ends each response before the apiserver's
    request timeout, and a guest silent for ``--idle-reconnect`` seconds is no error either:
    the plugin asks again from the byte it got to."""
    vms.get(args.name)  # "not found" said plainly, before any console request
    follow = "false" if args.no_follow else "true"
    printed = 0
    while True:
        query = {"follow": follow, "offset": str(printed)}
        response = _open(vms, args.name, "console", query, args.idle_reconnect)
        try:
            while chunk := response.read1(65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                printed += len(chunk)
            if args.no_follow:
                return ""
        except (TimeoutError, urllib3.exceptions.ReadTimeoutError) as exc:
            if args.no_follow:
                raise PluginError(f"the console of {args.name} broke off: {exc}") from exc
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise PluginError(f"the console of {args.name} broke off: {exc}") from exc
        finally:
            response.release_conn()


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
    names = [vm.metadata.name for vm in targets]

    def sample() -> tuple[float, dict[str, Any]]:
        counters: dict[str, Any] = {}
        for name in names:
            try:
                response = _open(vms, name, "stats", {}, 30)
            except PluginError:
                if args.name:
                    raise
                continue  # stopped, or gone since the list: not in the table
            try:
                counters[name] = json.loads(response.read())
            finally:
                response.release_conn()
        return time.monotonic(), counters

    first_at, first = sample()
    time.sleep(args.interval)
    second_at, second = sample()
    rows = top_rows(first, second, max(second_at - first_at, 1e-3))
    if len(rows) == 1:
        raise PluginError("no running VM to show: a stopped VM has no counters")
    return table(rows)
