"""Typed models of the custom resources, mirroring ``crds/`` field by field.

``tests/api/test_crds.py`` walks these models and the CRD schemas side by side, so a
field added to one and not the other fails the tests. The CRDs are the canonical copy (they carry
the descriptions, defaults and CEL rules users meet); these models are what the code reads.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from formation_vmm.api.quantity import parse_quantity

RunStrategy = Literal["Always", "RerunOnFailure", "Once", "Halted"]
EvictionStrategy = Literal["LiveMigrate", "LiveMigrateIfPossible", "Restart", "None"]
VmPhase = Literal[
    "Pending",
    "Scheduled",
    "Provisioning",
    "Starting",
    "Running",
    "Paused",
    "Migrating",
    "Stopping",
    "Stopped",
    "Failed",
    "Terminating",
    "Unknown",
]
ImagePhase = Literal["Pending", "Downloading", "Converting", "Ready", "Failed"]
ImageFormat = Literal["auto", "raw", "qcow2", "vmdk", "form"]
ConditionStatus = Literal["True", "False", "Unknown"]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are ignored, not fatal."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


def to_wire(model: BaseModel) -> dict[str, Any]:
    """The fields of ``model`` that were set (read, or assigned), as the API spells them: what a
    status patch sends. A field set to None is sent as null, which removes it."""
    return model.model_dump(by_alias=True, exclude_unset=True, mode="json")


# --- VirtualMachine -------------------------------------------------------------------------


class CpuTopology(ApiModel):
    cores: int = 1
    sockets: int = 1
    threads: int = 1


class Disk(ApiModel):
    name: str
    image: str | None = None
    size: str | None = None
    bus: Literal["virtio", "sata", "scsi"] = "virtio"
    read_only: bool = False
    boot_order: int | None = None


class KernelBoot(ApiModel):
    image: str
    initrd: str | None = None
    cmdline: str | None = None


class Firmware(ApiModel):
    type: Literal["bios", "efi"] = "bios"
    secure_boot: bool = False


class SecretKeyRef(ApiModel):
    name: str
    key: str = "userdata"


class CloudInit(ApiModel):
    user_data: str | None = None
    user_data_secret_ref: SecretKeyRef | None = None
    network_data: str | None = None


class Network(ApiModel):
    name: str
    network: str | None = None
    bridge: str | None = None
    mac_address: str | None = None
    model: Literal["virtio", "e1000", "rtl8139"] = "virtio"


class Toleration(ApiModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class TcpSocketProbe(ApiModel):
    port: int


class HttpGetProbe(ApiModel):
    port: int
    path: str = "/"


class GuestAgentPingProbe(ApiModel):
    pass


class Probe(ApiModel):
    tcp_socket: TcpSocketProbe | None = None
    http_get: HttpGetProbe | None = None
    guest_agent_ping: GuestAgentPingProbe | None = None
    initial_delay_seconds: int = 0
    period_seconds: int = 10
    timeout_seconds: int = 1
    success_threshold: int = 1
    failure_threshold: int = 3


class VirtualMachineSpec(ApiModel):
    run_strategy: RunStrategy = "Always"
    paused: bool = False
    restart_requested_at: datetime | None = None
    cpu: CpuTopology | None = None
    cpus: int | None = None
    memory: str = "512Mi"
    disks: list[Disk] = Field(default_factory=list)
    kernel: KernelBoot | None = None
    firmware: Firmware = Field(default_factory=Firmware)
    cloud_init: CloudInit | None = None
    networks: list[Network] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    eviction_strategy: EvictionStrategy | None = None
    # Its owner accepts that a restart on another node (a drain's Restart, a lost node) starts
    # it from its images: what the guest wrote to its local overlays is lost.
    allow_disk_loss: bool = False
    tolerations: list[Toleration] = Field(default_factory=list)
    readiness_probe: Probe | None = None
    liveness_probe: Probe | None = None
    termination_grace_period_seconds: int = 30

    @property
    def topology(self) -> CpuTopology:
        """The CPU topology, whichever of ``cpu`` and ``cpus`` the user wrote."""
        if self.cpu is not None:
            return self.cpu
        return CpuTopology(cores=self.cpus or 1)

    @property
    def vcpus(self) -> int:
        topo = self.topology
        return topo.cores * topo.sockets * topo.threads

    @property
    def memory_bytes(self) -> int:
        return parse_quantity(self.memory)

    @property
    def disk_bytes(self) -> int:
        """The disks' declared sizes (a disk from an image without a size counts as nothing:
        its size is the image's, which only the node knows)."""
        return sum(parse_quantity(disk.size) for disk in self.disks if disk.size)


class Condition(ApiModel):
    type: str
    status: ConditionStatus
    reason: str = ""
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class InterfaceStatus(ApiModel):
    name: str
    mac: str | None = None
    network: str | None = None
    ip_address: str | None = None
    info_source: str | None = None  # "ipam", "ipam, lease", "lease", "guest-agent", ...


class GuestOSInfo(ApiModel):
    """What the guest agent says of the guest's OS (``guest-get-osinfo``): the guest's word,
    shown as it is, cut to ``GUEST_INFO_MAX`` characters a field."""

    name: str | None = None
    version: str | None = None
    version_id: str | None = None
    id: str | None = None
    pretty_name: str | None = None
    kernel_release: str | None = None
    kernel_version: str | None = None
    machine: str | None = None


GUEST_INFO_MAX = 256


class SealedValue(ApiModel):
    """A Secret's value sealed to one node's agent (see sealing.py); or why it is not there."""

    node: str
    key_id: str | None = None
    data: str | None = None
    secret_version: str | None = None  # the Secret's resourceVersion when it was sealed
    error: str | None = None  # why the controller could not seal it (a missing Secret or key)


MigrationPhase = Literal[
    "Pending", "Scheduling", "Preparing", "Migrating", "Succeeded", "Failed", "Cancelled"
]


class VmMigrationSummary(ApiModel):
    """A VM's migration as its status shows it (the controller copies it from the VmMigration)."""

    name: str | None = None
    phase: str | None = None
    source_node: str | None = None
    target_node: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    message: str | None = None


class VirtualMachineStatus(ApiModel):
    phase: VmPhase | None = None
    node_name: str | None = None
    interfaces: list[InterfaceStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = None
    domain_uuid: str | None = Field(default=None, alias="domainUUID")
    started_at: datetime | None = None
    restart_count: int = 0
    message: str | None = None
    vcpus: int | None = None
    last_restart_requested_at: datetime | None = None
    sealed_user_data: SealedValue | None = None
    guest_os_info: GuestOSInfo | None = Field(default=None, alias="guestOSInfo")
    migration: VmMigrationSummary | None = None


class ObjectMeta(ApiModel):
    name: str
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None
    deletion_timestamp: datetime | None = None


class VirtualMachine(ApiModel):
    metadata: ObjectMeta
    spec: VirtualMachineSpec = Field(default_factory=VirtualMachineSpec)
    status: VirtualMachineStatus = Field(default_factory=VirtualMachineStatus)


# --- VmImage -------------------------------------------------------------------------------


class AuthSecretRef(ApiModel):
    name: str
    key: str = "authorization"


class HttpSource(ApiModel):
    url: str
    secret_ref: AuthSecretRef | None = None


class HostPathSource(ApiModel):
    path: str


class ImageSource(ApiModel):
    http: HttpSource | None = None
    host_path: HostPathSource | None = None


class VmImageSpec(ApiModel):
    source: ImageSource
    format: ImageFormat = "auto"
    checksum: str | None = None
    prefetch: Literal["OnDemand", "AllNodes"] = "OnDemand"


class ImageNodeStatus(ApiModel):
    name: str
    phase: ImagePhase
    message: str | None = None


class VmImageStatus(ApiModel):
    phase: ImagePhase | None = None
    progress: str | None = None
    size: int | None = None
    virtual_size: int | None = None
    format: str | None = None
    nodes: list[ImageNodeStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    credentials: list[SealedValue] = Field(default_factory=list)


class VmImage(ApiModel):
    metadata: ObjectMeta
    spec: VmImageSpec
    status: VmImageStatus = Field(default_factory=VmImageStatus)


# --- VmNetwork -----------------------------------------------------------------------------

NetworkMode = Literal["nat", "isolated", "bridge"]


class DhcpRange(ApiModel):
    start: str
    end: str


class LabelRequirement(ApiModel):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)


class LabelSelector(ApiModel):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelRequirement] = Field(default_factory=list)


class VmNetworkSpec(ApiModel):
    mode: NetworkMode
    subnet: str | None = None
    dhcp_range: DhcpRange | None = None
    bridge: str | None = None
    namespace_selector: LabelSelector | None = None


class NetworkNodeStatus(ApiModel):
    name: str
    phase: Literal["Ready", "Failed"]
    reason: str | None = None
    message: str | None = None
    bridge: str | None = None


class VmNetworkStatus(ApiModel):
    nodes_ready: str | None = None
    nodes: list[NetworkNodeStatus] = Field(default_factory=list)


class VmNetwork(ApiModel):
    metadata: ObjectMeta
    spec: VmNetworkSpec
    status: VmNetworkStatus = Field(default_factory=VmNetworkStatus)


# --- VmSnapshot and VmRestore ----------------------------------------------------------------


class VmSnapshotSpec(ApiModel):
    vm_name: str
    include_memory: bool = False


class VmSnapshotStatus(ApiModel):
    phase: Literal["Pending", "InProgress", "Ready", "Failed"] | None = None
    ready_to_use: bool | None = None
    creation_time: datetime | None = None
    size: int | None = None
    error: str | None = None
    node_name: str | None = None
    memory: bool | None = None
    disks: list[str] = Field(default_factory=list)
    # As KubeVirt's: Online (taken while the VM ran), GuestAgent (its filesystems were frozen
    # through the guest agent: filesystem-consistent) or NoGuestAgent (crash-consistent).
    indications: list[Literal["Online", "GuestAgent", "NoGuestAgent"]] | None = None


class VmSnapshot(ApiModel):
    metadata: ObjectMeta
    spec: VmSnapshotSpec
    status: VmSnapshotStatus = Field(default_factory=VmSnapshotStatus)


class VmRestoreSpec(ApiModel):
    vm_name: str
    snapshot_name: str


class VmRestoreStatus(ApiModel):
    phase: Literal["Pending", "InProgress", "Succeeded", "Failed"] | None = None
    completed_at: datetime | None = None
    error: str | None = None


class VmRestore(ApiModel):
    metadata: ObjectMeta
    spec: VmRestoreSpec
    status: VmRestoreStatus = Field(default_factory=VmRestoreStatus)


# --- VmMigration -------------------------------------------------------------------------------


class VmMigrationSpec(ApiModel):
    vm_name: str
    target_node: str | None = None


class MigrationProgress(ApiModel):
    summary: str | None = None
    memory_total: int | None = None
    memory_remaining: int | None = None
    disk_total: int | None = None
    disk_remaining: int | None = None
    bandwidth: int | None = None
    downtime_milliseconds: int | None = None


class VmMigrationStatus(ApiModel):
    phase: MigrationPhase | None = None
    message: str | None = None
    reason: str | None = None
    source_node: str | None = None
    target_node: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    domain_moved: bool | None = None
    progress: MigrationProgress | None = None
    sealed_user_data: SealedValue | None = None  # for the target node (controller/sealer.py)


class VmMigration(ApiModel):
    metadata: ObjectMeta
    spec: VmMigrationSpec
    status: VmMigrationStatus = Field(default_factory=VmMigrationStatus)
