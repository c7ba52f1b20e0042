"""Creation-to-Running for N VMs across M agents on libvirt's test driver, against the real
control plane: latency percentiles, throughput, API writes per VM and peak memory per process.

    .venv/bin/python -m bench.create_vms --vms 1000 --agents 5

Also times the bare apiserver doing the minimum a VM needs (a create and a status write, no
controller, no agent) in the same run, before our burst and again after it (the controller and
agents stopped), and prints our throughput as a ratio of the two's mean: this machine's speed
drifts by a quarter within minutes, and a baseline on one side only carried that drift into the
ratio. The drift between the two is printed too. A small burst warms the fresh apiserver up
first, so the first baseline does not pay for its first use. With --prebound, the VMs are
created already bound (the label and finalizer the controller's binding writes): what binding at
admission would buy, measured without building it. Fails fast
when VMs stay unschedulable or stop moving; stops every process it started on success, failure,
SIGINT and SIGTERM.

Needs the control-plane binaries (hack/control-plane-bins.sh; VMM_BIN_DIR set by hack/env.sh).
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any

from kubernetes import client, config, watch

from formation_vmm.api.names import (
    CAPACITY_CPUS_ANNOTATION,
    CAPACITY_MEMORY_ANNOTATION,
    GROUP,
    NODE_LABEL,
    VERSION,
    VM_PLURAL,
    agent_finalizer,
)
from formation_vmm.api.quantity import parse_quantity
from formation_vmm.devcluster.cluster import (
    TEST_DRIVER_ALLOCATABLE,
    Kubectl,
    OperatorProcess,
    install_crds,
    install_rbac,
    register_node,
    service_account_kubeconfig,
    start_agent,
    start_controller,
)
from formation_vmm.devcluster.controlplane import ControlPlane

WRITE_VERBS = {"POST", "PUT", "PATCH", "DELETE"}
READ_VERBS = {"GET", "LIST"}
# VMs created and written once before the baseline is timed (see run()).
WARM_UP = 200
# Clients creating VMs at once, in our run and in the bare apiserver's: a burst comes from many.
CREATORS = 8
VM_MEMORY = "32Mi"
# A VM whose Scheduled condition stays False this long fails the run, with its reason.
UNSCHEDULABLE_GRACE = 10.0
# No VM reached Running for this long: the run fails, saying where the VMs are.
STALL_SECONDS = 60.0
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


def _status_kib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return float(line.split()[1])
    return float("nan")


def peak_rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmHWM") / 1024


def rss_kib(pid: int) -> float:
    return _status_kib(pid, "VmRSS")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def vm_body(
    name: str, image: str | None = None, namespace: str = "default", node: str | None = None
) -> dict[str, Any]:
    """A VM of 1 vCPU; with ``node``, created already bound there (the label and the agent's
    finalizer the controller's binding writes), as binding at admission would create it."""
    spec: dict[str, Any] = {"cpus": 1, "memory": VM_MEMORY}
    if image:  # a root disk from the image: a qcow2 overlay on the node's cached base
        spec["disks"] = [{"name": "root", "image": image}]
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if node:
        metadata.update(labels={NODE_LABEL: node}, finalizers=[agent_finalizer(node)])
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "VirtualMachine", "metadata": metadata, "spec": spec}


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
    """Records when each VM is first seen Running, and what holds back the others, from a watch
    in a thread of its own."""

    def __init__(self, api: client.CustomObjectsApi, expected: int) -> None:
        self.api = api
        self.expected = expected
        self.running: dict[str, float] = {}
        self.latest: dict[str, dict[str, Any]] = {}  # name -> the VM as last seen
        self.refused_since: dict[str, float] = {}  # name -> when Scheduled=False was first seen
        self.done = threading.Event()
        self.error: BaseException | None = None
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        try:
            stream = watch.Watch()  # type: ignore[no-untyped-call]
            for event in stream.stream(  # type: ignore[no-untyped-call]
                self.api.list_namespaced_custom_object, GROUP, VERSION, "default", VM_PLURAL
            ):
                obj = event["object"]
                name = obj["metadata"]["name"]
                self.latest[name] = obj
                if _scheduled(obj).get("status") == "False":
                    self.refused_since.setdefault(name, time.monotonic())
                else:
                    self.refused_since.pop(name, None)
                if obj.get("status", {}).get("phase") == "Running" and name not in self.running:
                    self.running[name] = time.monotonic()
                    if len(self.running) == self.expected:
                        stream.stop()  # type: ignore[no-untyped-call]
                        self.done.set()
                        return
        except BaseException as exc:  # the waiter reports it
            self.error = exc
            self.done.set()

    def wait(self) -> None:
        """Until every VM runs; fails fast, saying why, when VMs stay unschedulable or nothing
        moves any more."""
        last_count, last_progress = -1, time.monotonic()
        while not self.done.wait(timeout=0.5):
            now = time.monotonic()
            stuck = [n for n, since in list(self.refused_since.items()) if now - since > UNSCHEDULABLE_GRACE]
            if stuck:
                said = [_scheduled(self.latest[n]) for n in stuck]
                reasons = Counter(f"{c.get('reason')}: {c.get('message')}" for c in said)
                raise SystemExit(
                    f"{len(stuck)} VMs stayed unschedulable for {UNSCHEDULABLE_GRACE:.0f} s: "
                    + "; ".join(f"{count} x {text}" for text, count in reasons.most_common(3))
                )
            if len(self.running) != last_count:
                last_count, last_progress = len(self.running), now
            elif now - last_progress > STALL_SECONDS:
                phases = Counter(v.get("status", {}).get("phase") or "none" for v in self.latest.values())
                raise SystemExit(
                    f"only {len(self.running)}/{self.expected} VMs reached Running, none in the last "
                    f"{STALL_SECONDS:.0f} s; phases {dict(phases)}"
                )
        if self.error is not None:
            raise SystemExit(f"the watch on the VMs failed: {self.error}")


def _scheduled(vm: dict[str, Any]) -> dict[str, Any]:
    """The VM's Scheduled condition ({} before it has one)."""
    conditions = vm.get("status", {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "Scheduled"), {})


def node_names(agents: int) -> list[str]:
    """The test nodes, one per agent."""
    return [f"bench-{i}" for i in range(agents)]


def start_cluster(
    plane: ControlPlane, agents: int, vms: int
) -> tuple[Kubectl, OperatorProcess, list[OperatorProcess]]:
    """The product as installed (manifests' RBAC and admission policies, the controller's and
    node-bound agent tokens), with the overcommit the burst needs to fit on the test nodes."""
    kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
    install_crds(kubectl)
    install_rbac(kubectl)
    nodes = node_names(agents)
    for node in nodes:
        register_node(kubectl, node, allocatable=TEST_DRIVER_ALLOCATABLE)
    agent_procs = [
        start_agent(
            plane,
            node,
            "test:///default",
            "test",
            kubeconfig=service_account_kubeconfig(kubectl, plane, "formation-vmm-agent", node),
        )
        for node in nodes
    ]
    for proc in agent_procs:
        proc.wait_ready()
    cpu_ratio, memory_ratio = overcommit_to_fit(kubectl, nodes, vms)
    controller = start_controller(
        plane,
        {"VMM_CPU_OVERCOMMIT": f"{cpu_ratio:g}", "VMM_MEMORY_OVERCOMMIT": f"{memory_ratio:g}"},
        kubeconfig=service_account_kubeconfig(kubectl, plane, "formation-vmm-controller"),
    )
    controller.wait_ready()
    return kubectl, controller, agent_procs


def overcommit_to_fit(kubectl: Kubectl, nodes: list[str], vms: int) -> tuple[float, float]:
    """The CPU and memory overcommit ratios at which ``vms`` one-vCPU VMs fit on ``nodes`` as
    their agents report them (libvirt's test driver has 16 CPUs and a few GiB per node), with a
    quarter to spare for uneven spreading."""
    per_node = math.ceil(vms / len(nodes) * 1.25)
    cpus, memory = [], []
    for node in nodes:
        annotations = json.loads(kubectl("get", "node", node, "-o", "json"))["metadata"]["annotations"]
        cpus.append(int(annotations[CAPACITY_CPUS_ANNOTATION]))
        memory.append(parse_quantity(annotations[CAPACITY_MEMORY_ANNOTATION]))
    need_memory = per_node * parse_quantity(VM_MEMORY)
    return max(1.0, math.ceil(per_node / min(cpus))), max(1.0, math.ceil(need_memory / min(memory)))


def create_one(api: client.CustomObjectsApi, body: dict[str, Any], then_status: bool = False) -> float:
    """Create one VM; with ``then_status`` also write its status once, as an agent would.
    Returns when it was created."""
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    api.create_namespaced_custom_object(GROUP, VERSION, ns, VM_PLURAL, body)
    created = time.monotonic()
    if then_status:
        status = {"status": {"phase": "Running", "nodeName": "bench-0", "vcpus": 1}}
        api.patch_namespaced_custom_object_status(GROUP, VERSION, ns, VM_PLURAL, name, status)
    return created


def create_all(
    api: client.CustomObjectsApi, bodies: list[dict[str, Any]], then_status: bool = False
) -> dict[str, float]:
    """Create ``bodies`` from CREATORS clients at once. Returns when each was created."""
    with ThreadPoolExecutor(max_workers=CREATORS) as pool:
        times = pool.map(lambda body: create_one(api, body, then_status), bodies)
        return {body["metadata"]["name"]: at for body, at in zip(bodies, times, strict=True)}


def bare_rate(plane: ControlPlane, kubectl: Kubectl, vms: int, namespace: str) -> tuple[float, float]:
    """The apiserver alone doing the minimum a VM needs: a create and a status write each, from
    the same number of clients; no controller, no agent. VMs per second, and the apiserver's
    CPU milliseconds per VM (set beside ours: how much more work our VM is to it)."""
    kubectl("create", "namespace", namespace)
    api = client.CustomObjectsApi()
    bodies = [vm_body(f"bare-{i:04d}", namespace=namespace) for i in range(vms)]
    apiserver = plane.processes.read()["kube-apiserver"]
    cpu = cpu_seconds(apiserver)
    started = time.monotonic()
    create_all(api, bodies, then_status=True)
    rate = vms / (time.monotonic() - started)
    cpu_ms = (cpu_seconds(apiserver) - cpu) * 1000 / vms
    kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=300s")
    return rate, cpu_ms


def stop_operators(plane: ControlPlane, procs: list[OperatorProcess]) -> None:
    """The controller and agents gone, so the bare run after ours has the apiserver to itself
    as the one before it had (the VMs stay: nothing of ours is left to act on them)."""
    for proc in procs:
        proc.kill()
        plane.processes.forget(proc.name)


def measure(
    plane: ControlPlane,
    kubectl: Kubectl,
    controller: OperatorProcess,
    agent_procs: list[OperatorProcess],
    vms: int,
    rate: float | None,
    image: str | None = None,
    prebound: bool = False,
) -> dict[str, Any]:
    api = client.CustomObjectsApi()
    seen = RunningWatch(api, vms)
    time.sleep(0.5)  # the watch is established
    before = api_requests(kubectl, WRITE_VERBS)
    reads_before = api_requests(kubectl, READ_VERBS)
    rss_before = {"controller": rss_kib(controller.pid), **{a.name: rss_kib(a.pid) for a in agent_procs}}
    watched = {**plane.processes.read(), "bench client": os.getpid()}
    cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
    nodes = node_names(len(agent_procs))
    bodies = [
        vm_body(f"vm-{i:04d}", image, node=nodes[i % len(nodes)] if prebound else None) for i in range(vms)
    ]
    started = time.monotonic()
    if rate:  # paced: the i-th VM is created at i / rate seconds, not as fast as possible
        created: dict[str, float] = {}
        for i, body in enumerate(bodies):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            created[body["metadata"]["name"]] = create_one(api, body)
    else:
        created = create_all(api, bodies)
    seen.wait()
    finished = time.monotonic()
    cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in watched.items()}
    rss_after = {"controller": rss_kib(controller.pid), **{a.name: rss_kib(a.pid) for a in agent_procs}}
    time.sleep(1)  # let trailing writes (events) land before counting
    after = api_requests(kubectl, WRITE_VERBS)
    reads_after = api_requests(kubectl, READ_VERBS)
    latencies = [seen.running[n] - created[n] for n in created]
    writes = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    vm_writes = sum(v for k, v in writes.items() if k.startswith("virtualmachines")) - vms  # less the creates
    held = vms / len(agent_procs)
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
        "controller_kib_per_vm": (rss_after["controller"] - rss_before["controller"]) / vms,
        "agent_kib_per_held_vm": [(rss_after[a.name] - rss_before[a.name]) / held for a in agent_procs],
        "rss_before": rss_before,
        "rss_after": rss_after,
    }


def run(
    vms: int,
    agents: int,
    rate: float | None = None,
    image_mib: int = 0,
    bare: bool = True,
    prebound: bool = False,
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="vmm-bench-"))
    plane = ControlPlane(root)
    ok = False
    try:
        plane.start()
        config.load_kube_config(config_file=str(plane.kubeconfig))  # type: ignore[no-untyped-call]
        kubectl = Kubectl(plane.binaries() / "kubectl", plane.kubeconfig)
        install_crds(kubectl)
        # The limit, measured beside us: before anything of ours runs, and again after. A
        # fresh apiserver's first writes of a kind pay for its first use (its validators and
        # caches built): a small burst first, so the baseline before ours does not pay for it.
        if bare:
            bare_rate(plane, kubectl, min(vms, WARM_UP), "bench-warm-up")
        before = bare_rate(plane, kubectl, vms, "bench-bare-before") if bare else None
        kubectl, controller, agent_procs = start_cluster(plane, agents, vms)
        image = cache_image(plane, kubectl, node_names(agents), image_mib) if image_mib else None
        result = measure(plane, kubectl, controller, agent_procs, vms, rate, image, prebound)
        result.update(
            prebound=prebound,
            image_mib=image_mib,
            vms=vms,
            agents=agents,
            rate=rate,
            rss_controller=peak_rss_mib(controller.pid),
            rss_agents=[peak_rss_mib(p.pid) for p in agent_procs],
        )
        after = None
        if bare:
            stop_operators(plane, [controller, *agent_procs])
            after = bare_rate(plane, kubectl, vms, "bench-bare-after")
        result.update(bare_before=before, bare_after=after)
        ok = True
        return result
    finally:
        plane.stop()  # the operators are recorded in the plane's process table too
        if ok:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs kept in {root / 'logs'}")


def _stop_on_signal(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM and SIGINT unwind through run()'s ``finally``: every process it started stops."""
    raise SystemExit(f"stopped by signal {signal.Signals(signum).name}")


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
    parser.add_argument(
        "--no-bare",
        action="store_true",
        help="skip the bare apiserver's baseline (two more bursts of the apiserver alone)",
    )
    parser.add_argument(
        "--prebound",
        action="store_true",
        help=(
            "create each VM already bound to a node (round-robin): what binding at admission would "
            "buy, with no binding write from the controller; a measurement, not the product's path"
        ),
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    r = run(args.vms, args.agents, args.rate, args.image_mib, bare=not args.no_bare, prebound=args.prebound)
    kubevirt_p50, kubevirt_p95 = 15.0, 20.0  # the low ends of KubeVirt's published 100-VM figures
    print(f"machine: {platform.node()} {platform.machine()}, {len(os.sched_getaffinity(0))} cores")
    pace = f"created at {r['rate']:g}/s" if r["rate"] else "created all at once"
    disks = f", each with a root disk on a cached {r['image_mib']} MiB image" if r["image_mib"] else ""
    disks += ", created already bound (--prebound: no binding write)" if r["prebound"] else ""
    print(
        f"{r['vms']} VMs {pace} across {r['agents']} agents{disks} "
        "(libvirt test driver, real kube-apiserver + etcd)"
    )
    print(f"creation-to-Running  p50 {r['p50']:.2f} s   p95 {r['p95']:.2f} s   max {r['max']:.2f} s")
    print(
        "  vs KubeVirt (p50 15-25 s, p95 20-40 s): "
        f"p50 {kubevirt_p50 / r['p50']:.1f}x, p95 {kubevirt_p95 / r['p95']:.1f}x its best (over 1: faster)"
    )
    print(f"throughput           {r['throughput']:.1f} VMs/s")
    if r["bare_before"] and r["bare_after"]:
        (before, before_ms), (after, after_ms) = r["bare_before"], r["bare_after"]
        mean = (before + after) / 2
        print(
            f"  the bare apiserver (a create and a status write per VM, {CREATORS} clients): "
            f"{before:.1f} VMs/s before ours, {after:.1f} after (drift {abs(after - before) / mean:.0%}); "
            f"ours is {r['throughput'] / mean:.2f} of their mean"
        )
        ours_ms = r["cpu"]["kube-apiserver"] * 1000 / r["vms"]
        print(
            f"  the apiserver's CPU per VM: {ours_ms:.1f} ms in ours, {before_ms:.1f} and {after_ms:.1f} "
            f"in the bare runs ({ours_ms / ((before_ms + after_ms) / 2):.1f}x)"
        )
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
    print(
        f"memory per VM        controller {r['controller_kib_per_vm']:.1f} KiB per VM in the cluster; "
        "agents "
        + ", ".join(f"{v:.1f}" for v in r["agent_kib_per_held_vm"])
        + f" KiB per VM they hold ({r['vms'] / r['agents']:.0f} each)"
    )


if __name__ == "__main__":
    main()
