"""Creation-to-Running for N VMs across M agents on libvirt's test driver, against the real
control plane: latency percentiles, throughput, API writes per VM and peak memory per process.

    .venv/bin/python -m bench.create_vms --vms 200 --agents 3

Needs the control-plane binaries (hack/control-plane-bins.sh; VMM_BIN_DIR set by hack/env.sh).
"""

import argparse
import os
import platform
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from formation_vmm.api.names import GROUP, VERSION, VM_PLURAL
from formation_vmm.devcluster.cluster import (
    Kubectl,
    OperatorProcess,
    install_crds,
    register_node,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.controlplane import ControlPlane

WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}
READ_VERBS = {"GET", "LIST"}
_METRIC = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


def api_requests(kubectl: Kubectl, verbs: set[str]) -> dict[str, float]:
    """Requests of ``verbs`` the apiserver has served so far, by resource (and subresource)."""
    totals: dict[str, float] = {}
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        match = _METRIC.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group("labels")))
        if labels.get("verb") not in verbs:
            continue
        key = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource") else "")
        totals[key] = totals.get(key, 0.0) + float(match.group("value"))
    return totals


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def vm_body(name: str, image: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"cpus": 1, "memory": "32Mi"}
    if image:  # a root disk from the image: a qcow2 overlay on the node's cached base
        spec["disks"] = [{"name": "root", "image": image}]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    }


def cache_image(plane: ControlPlane, kubectl: Kubectl, nodes: list[str], size_mib: int) -> str:
    """A qcow2 image of ``size_mib`` (every MiB written) as a hostPath VmImage with
    ``prefetch: AllNodes``, imported on every node before the clock starts."""
    import json
    import subprocess

    raw = plane.root / "bench-image.raw"
    with raw.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(1 << 20))
    for node in nodes:
        images = plane.root / "nodes" / node / "images"
        images.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(images / "bench.qcow2")], check=True
        )
    doc = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VmImage",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"source": {"hostPath": {"path": "bench.qcow2"}}, "prefetch": "AllNodes"},
    }
    kubectl("apply", "-f", "-", input_text=json.dumps(doc))
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        got = json.loads(kubectl("get", "vmimg", "bench", "-o", "json"))
        if got.get("status", {}).get("phase") == "Ready" and len(got["status"].get("nodes", [])) == len(
            nodes
        ):
            return "bench"
        time.sleep(0.5)
    raise SystemExit("the benchmark image did not become Ready on every node")


class RunningWatch:
    """Records when each VM is first seen Running, from a watch in a thread of its own."""

    def __init__(self, api: client.CustomObjectsApi, expected: int) -> None:
        self.api = api
        self.expected = expected
        self.running: dict[str, float] = {}
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        stream = watch.Watch()
        for event in stream.stream(
            self.api.list_namespaced_custom_object, GROUP, VERSION, "default", VM_PLURAL
        ):
            obj = event["object"]
            name = obj["metadata"]["name"]
            if obj.get("status", {}).get("phase") == "Running" and name not in self.running:
                self.running[name] = time.monotonic()
                if len(self.running) == self.expected:
                    stream.stop()
                    self.done.set()
                    return


def start_cluster(plane: ControlPlane, agents: int) -> tuple[Kubectl, OperatorProcess, list[OperatorProcess]]:
    kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
    install_crds(kubectl)
    nodes = [f"bench-{i}" for i in range(agents)]
    for node in nodes:
        register_node(kubectl, node)
    # The test driver reports 16 CPUs per node; the benchmark packs more VMs than that.
    controller = start_controller(plane, {"VMM_CPU_OVERCOMMIT": "16"})
    agent_procs = [start_agent(plane, node, "test:///default", "test") for node in nodes]
    for proc in [controller, *agent_procs]:
        proc.wait_ready()
    time.sleep(2)  # first heartbeats and capacity reach the controller
    return kubectl, controller, agent_procs


def measure(
    plane: ControlPlane, kubectl: Kubectl, vms: int, rate: float | None, image: str | None = None
) -> dict[str, Any]:
    config.load_kube_config(config_file=str(plane.kubeconfig))
    api = client.CustomObjectsApi()
    seen = RunningWatch(api, vms)
    time.sleep(0.5)  # the watch is established
    before = api_requests(kubectl, WRITE_VERBS)
    reads_before = api_requests(kubectl, READ_VERBS)
    watched = {**plane.processes.read(), "bench client": os.getpid()}
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    created: dict[str, float] = {}
    started = time.monotonic()
    for i in range(vms):
        if rate:  # paced: the i-th VM is created at i / rate seconds, not as fast as possible
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
        name = f"vm-{i:04d}"
        api.create_namespaced_custom_object(GROUP, VERSION, "default", VM_PLURAL, vm_body(name, image))
        created[name] = time.monotonic()
    if not seen.done.wait(timeout=600):
        raise SystemExit(f"only {len(seen.running)}/{vms} VMs reached Running in 600 s")
    finished = time.monotonic()
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in watched.items()}
    time.sleep(1)  # let trailing writes (events) land before counting
    after = api_requests(kubectl, WRITE_VERBS)
    reads_after = api_requests(kubectl, READ_VERBS)
    latencies = [seen.running[n] - created[n] for n in created]
    writes = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    vm_writes = sum(v for k, v in writes.items() if k.startswith("virtualmachines")) - vms  # less the creates
    return {
        "p50": statistics.median(latencies),
        "p95": percentile(latencies, 0.95),
        "max": max(latencies),
        "throughput": vms / (finished - started),
        "vm_writes_per_vm": vm_writes / vms,
        "event_writes_per_vm": writes.get("events", 0.0) / vms,
        "writes": {k: v for k, v in sorted(writes.items()) if v},
        "reads": {
            k: v - reads_before.get(k, 0.0)
            for k, v in sorted(reads_after.items())
            if v - reads_before.get(k, 0.0)
        },
        "cpu": cpu,
        "seconds": finished - started,
    }


def run(vms: int, agents: int, rate: float | None = None, image_mib: int = 0) -> dict[str, Any]:
    plane = ControlPlane(Path(tempfile.mkdtemp(prefix="vmm-bench-")))
    plane.start()
    try:
        kubectl, controller, agent_procs = start_cluster(plane, agents)
        image = (
            cache_image(plane, kubectl, [f"bench-{i}" for i in range(agents)], image_mib)
            if image_mib
            else None
        )
        result = measure(plane, kubectl, vms, rate, image)
        result.update(
            image_mib=image_mib,
            vms=vms,
            agents=agents,
            rate=rate,
            rss_controller=peak_rss_mib(controller.pid),
            rss_agents=[peak_rss_mib(p.pid) for p in agent_procs],
        )
        return result
    finally:
        plane.stop()  # the operators are recorded in the plane's process table too


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vms", type=int, default=200)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--rate", type=float, help="create this many VMs per second (default: all at once)")
    parser.add_argument(
        "--image-mib",
        type=int,
        default=0,
        help="give each VM a root disk from a cached image of this size (overlay creation on the path)",
    )
    args = parser.parse_args()
    r = run(args.vms, args.agents, args.rate, args.image_mib)
    kubevirt_p50, kubevirt_p95 = 15.0, 20.0  # the low ends of KubeVirt's published 100-VM figures
    print(f"machine: {platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores")
    pace = f"created at {r['rate']:g}/s" if r["rate"] else "created all at once"
    disks = f", each with a root disk on a cached {r['image_mib']} MiB image" if r["image_mib"] else ""
    print(
        f"{r['vms']} VMs {pace} across {r['agents']} agents{disks} "
        "(libvirt test driver, real kube-apiserver + etcd)"
    )
    print(f"creation-to-Running  p50 {r['p50']:.2f} s   p95 {r['p95']:.2f} s   max {r['max']:.2f} s")
    print(
        "  vs KubeVirt (p50 15-25 s, p95 20-40 s): "
        f"p50 {kubevirt_p50 / r['p50']:.0f}x, p95 {kubevirt_p95 / r['p95']:.0f}x faster than its best case"
    )
    print(f"throughput           {r['throughput']:.1f} VMs/s")
    print(
        f"API writes per VM    {r['vm_writes_per_vm']:.2f} to the VM object, "
        f"{r['event_writes_per_vm']:.2f} events"
    )
    print(f"  by resource: {r['writes']}")
    print(f"API reads (GET, LIST): {r['reads']}")
    print(
        f"CPU seconds in {r['seconds']:.1f} s: "
        + ", ".join(f"{name} {sec:.1f}" for name, sec in sorted(r["cpu"].items(), key=lambda kv: -kv[1]))
    )
    print(
        f"peak RSS             controller {r['rss_controller']:.0f} MiB, agents "
        + ", ".join(f"{v:.0f}" for v in r["rss_agents"])
        + " MiB"
    )


if __name__ == "__main__":
    main()
