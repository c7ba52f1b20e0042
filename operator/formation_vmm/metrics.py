"""Prometheus metrics of the controller and the agent, served on /metrics."""

from prometheus_client import Counter, Gauge, Histogram

BINDINGS = Counter(
    "vmm_controller_bindings_total",
    "Placement decisions, by result (bound, unschedulable, quotaexceeded, conflict).",
    ["result"],
)
PENDING = Gauge("vmm_controller_pending_vms", "VMs waiting for a node, as of the last binding pass.")
NODES_LOST = Gauge("vmm_controller_lost_nodes", "Hypervisor nodes whose agent stopped reporting.")

SYNCS = Counter(
    "vmm_agent_syncs_total",
    "VM syncs by the agent, by outcome (idle, acted, waiting, failed, invalid).",
    ["outcome"],
)
SYNC_SECONDS = Histogram(
    "vmm_agent_sync_seconds",
    "Time one VM sync took (plan, libvirt calls, status write).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ACTIONS = Counter("vmm_agent_actions_total", "Actions carried out on domains, by action.", ["action"])
DOMAIN_EVENTS = Counter(
    "vmm_agent_libvirt_events_total", "libvirt lifecycle events received, by event.", ["event"]
)
STATUS_WRITES = Counter("vmm_status_writes_total", "Status patches sent to the API.")
EVENTS = Counter("vmm_events_total", "Kubernetes Events posted, by reason.", ["reason"])
RESYNCS = Counter("vmm_agent_resyncs_total", "Periodic resyncs of every VM and domain of the node.")
HEARTBEATS = Counter("vmm_agent_heartbeats_total", "Heartbeats written to the agent's Node.")
IMAGE_IMPORTS = Counter(
    "vmm_agent_image_imports_total",
    "Image imports on this node, by result (ready, or the failure's reason).",
    ["result"],
)
IMAGE_IMPORT_SECONDS = Histogram(
    "vmm_agent_image_import_seconds",
    "Time from the start of an import to its cached base (download, checks, conversion).",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
)
IMAGE_BYTES = Counter("vmm_agent_image_bytes_total", "Bytes fetched by image imports.")
IMAGE_CACHE_REMOVED = Counter("vmm_agent_image_cache_removed_total", "Cached bases removed by the collector.")
IMAGE_GC_RUNS = Counter("vmm_agent_image_gc_runs_total", "Passes of the image cache's garbage collector.")
MIGRATIONS = Counter(
    "vmm_agent_migrations_total",
    "Live migrations out of this node, by outcome (moved, failed).",
    ["outcome"],
)
RELAY_STREAMS = Counter(
    "vmm_agent_relay_streams_total",
    "Connections through the migration relay, by side (out: for a migration from this node; in: to"
    " it), stream (libvirt, memory, disks) and outcome (relayed, refused, failed, cut: ended by the"
    " target because its migration no longer asked for it; call-refused: a libvirt call a migration"
    " does not make).",
    ["side", "stream", "outcome"],
)
RELAY_BYTES = Counter(
    "vmm_agent_relay_bytes_total",
    "Bytes the migration relay carried towards the other node (out) and from it (in).",
    ["direction"],
)
SNAPSHOTS = Counter(
    "vmm_agent_snapshot_operations_total",
    "Snapshots and restores carried out, by operation and result.",
    ["operation", "result"],
)

# Time from a VM's creation to each phase it reaches on its way up (phase="Running" is
# creation to Running), as KubeVirt's kubevirt_vmi_phase_transition_time_from_creation_seconds.
PHASE_FROM_CREATION = Histogram(
    "vmm_vm_phase_transition_from_creation_seconds",
    "Time from a VM's creation to a phase it reached on its way up, by phase.",
    ["phase"],
    buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)

# The agent's work queue (workqueue.py), by kind of key: client-go's workqueue metrics.
QUEUE_DEPTH = Gauge("vmm_agent_queue_depth", "Keys queued and not yet taken, by kind.", ["kind"])
QUEUE_WAIT_SECONDS = Histogram(
    "vmm_agent_queue_wait_seconds",
    "Time a key waited in the queue before a worker took it, by kind.",
    ["kind"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_WORK_SECONDS = Histogram(
    "vmm_agent_queue_work_seconds",
    "Time one key's work took, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120, 600),
)
QUEUE_RETRIES = Counter(
    "vmm_agent_queue_retries_total",
    "Keys queued again for later, by kind and cause (asked: the work asked to look again; failed:"
    " it raised, and waits a back-off that doubles with each failure in a row).",
    ["kind", "cause"],
)
