"""Process configuration: a YAML file, then environment variables, then flags.

The variable names are those of the REST ``vmm-service`` this project replaces (``VMM_*``, and
``WAIT_FOR``), so existing deployments keep their settings. Precedence from low to high: defaults,
the file named by ``VMM_CONFIG_PATH`` (or ``--config``), environment variables, command-line
flags. A value that does not parse stops the process at start, naming the setting.
"""

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from formation_vmm.api.quantity import QuantityError, parse_quantity


class Settings(BaseSettings):
    """Every knob of the controller and the agent; each has an environment variable."""

    model_config = SettingsConfigDict(env_prefix="VMM_", extra="ignore")

    config_path: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    api_port: int = Field(default=3003, ge=0, le=65535, description="health and metrics HTTP port")
    # The agent's TLS port for the controller only: consoles and counters (agent/serving/controller_api.py);
    # 0: not served. A followed console's response lasts this long at most, under the apiserver's
    # request timeout (60 s): the client asks again from where it got to.
    access_port: int = Field(default=3004, ge=0, le=65535)
    console_segment_seconds: float = Field(default=45.0, gt=0)
    # The controller's aggregated API (controller/serving/subresources.py), behind the apiserver; 0: off.
    subresources_port: int = Field(default=8443, ge=0, le=65535)
    subresources_host: str = "0.0.0.0"  # noqa: S104 - the apiserver comes from outside the pod
    # The agent's node-local debug endpoints (/vms, /images, consoles of every VM), on
    # 127.0.0.1 only; 0: not served.
    debug_port: int = Field(default=0, ge=0, le=65535)
    api_host: str = "0.0.0.0"  # noqa: S104 - probes come from the kubelet, not from loopback
    vm_dir: Path = Path("/run/form-vm")
    images_dir: Path = Path("/var/lib/formation/vm-images")
    # The agent's own state: the key Secrets are sealed to for it, its lock file.
    state_dir: Path = Path("/var/lib/formation/agent")
    # Verified image bases, apart from images_dir so no hostPath VmImage can name them.
    image_cache_dir: Path = Path("/var/lib/formation/image-cache")
    # VM disks outlive reboots, so they are not under vm_dir (a tmpfs on most hosts).
    disks_dir: Path = Path("/var/lib/formation/vm-disks")
    # The firmware VMs boot through (spec.firmware): VMM_KERNEL_PATH, the replaced service's
    # "hypervisor firmware", is a BIOS image of the node's own (unset: QEMU's SeaBIOS); UEFI is
    # OVMF, from Debian's ovmf package unless these name other files.
    kernel_path: Path | None = None
    efi_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    efi_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
    efi_secure_code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd")
    efi_secure_vars: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd")
    libvirt_uri: str = "qemu:///system"
    domain_type: Literal["kvm", "qemu", "test"] = "kvm"
    # The agent's node; in a DaemonSet it comes from the downward API (spec.nodeName).
    node_name: str | None = None
    # Namespaces to watch; empty means the whole cluster.
    namespaces: list[str] = Field(default_factory=list)
    # Placement: what the agent keeps back for the host, and how far the controller may overcommit.
    reserved_cpus: int = Field(default=0, ge=0)
    reserved_memory: int = Field(default=0, ge=0, description="a quantity such as 2Gi, in bytes once read")
    cpu_overcommit: float = Field(default=1.0, gt=0)
    memory_overcommit: float = Field(default=1.0, gt=0)
    # An admin's bound on any node's capacity, for nodes whose kubelet reports no allocatable
    # (controller/binding/nodes.py): an agent's own word is never enough.
    node_max_cpus: int | None = Field(default=None, ge=0)
    node_max_memory: int | None = Field(default=None, ge=0, description="a quantity, in bytes once read")
    # How often the agent refreshes its heartbeat and capacity on the Node, and how long the
    # controller waits without one before it calls the node's VMs Unknown.
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # How often the agent compares every domain with its VM (drift, orphans, IP addresses).
    resync_seconds: float = Field(default=15.0, gt=0)
    # Start even when the node's libvirt confines QEMU with nothing (agent/vms/confinement.py):
    # for development and tests only, where QEMU runs as root in a private libvirtd.
    allow_unconfined_qemu: bool = False
    # The group each VM's QEMU runs in beside its own uid (qemu_uids.py); default: the group
    # that owns /dev/kvm as the agent sees it (the chart mounts it where domainType is kvm),
    # else the VM's uid.
    qemu_group: int | None = Field(default=None, ge=0)
    # The network namespace the agent's probes connect from (a file such as /run/netns/x), where
    # the node's VM networks live in one of their own (the dev cluster, the tests); unset: the
    # agent's own (a real node, whose VM networks are the host's).
    probe_netns: Path | None = None
    # Probe checks in flight at once on a node (all of them share one thread).
    probe_concurrency: int = Field(default=64, ge=1, le=1024)
    # Threads syncing VMs on a node; a sync never waits out a grace period, so a few suffice.
    sync_workers: int = Field(default=8, ge=1, le=64)
    # After SIGTERM, the process is gone within this many seconds, whatever it waits on (an
    # apiserver that does not answer holds threads in requests): below the pods' grace period.
    shutdown_seconds: float = Field(default=10.0, gt=0)
    # How long a VM whose inputs or hypervisor were not ready waits before it is tried again.
    retry_seconds: float = Field(default=10.0, gt=0)
    node_lost_seconds: float = Field(default=40.0, gt=0)
    # Live migration (docs/migration.md). KubeVirt's defaults: 5 at once in the cluster, 2 out
    # of each node, 150 s per GiB copied at most, 150 s without progress at most. 0: no
    # bandwidth limit. A node takes migrations when its agent runs the migration relay
    # (``migration_relay_listen``, host:port; docs/migration.md), or, on one machine only, when
    # ``migration_libvirt_uri`` and ``migration_socket_dir`` name its libvirtd and a directory
    # every node's libvirtd sees.
    migrations_in_cluster: int = Field(default=5, ge=1)
    migrations_per_node: int = Field(default=2, ge=1)
    migrations_per_namespace: int = Field(default=3, ge=1)
    migration_completion_timeout_per_gib: float = Field(default=150.0, gt=0)
    migration_progress_timeout_seconds: float = Field(default=150.0, gt=0)
    migration_bandwidth_mib: int = Field(default=0, ge=0)
    migration_auto_converge: bool = False
    # What a drain does to a VM whose spec.evictionStrategy is unset.
    eviction_strategy: Literal["LiveMigrate", "LiveMigrateIfPossible", "Restart", "None"] = (
        "LiveMigrateIfPossible"
    )
    migration_libvirt_uri: str | None = None
    migration_socket_dir: Path | None = None
    # The relay: where it listens (host:port; port 0 picks one), the host:port other nodes dial
    # (default: the listen address), the directory of its sockets as libvirtd and QEMU see it, the
    # same directory as the agent sees it (default: the same path), and this node's libvirtd
    # socket, which incoming RPC streams are connected to.
    migration_relay_listen: str | None = None
    migration_relay_advertise: str | None = None
    migration_relay_dir: Path = Path("/run/formation-vmm/migration")
    migration_relay_host_dir: Path | None = None
    migration_libvirt_socket: Path = Path("/run/libvirt/libvirt-sock")
    # uid:gid given a migration's socket directory on the target, for a QEMU that does not run
    # as root (the chart's libvirtd runs it as libvirt-qemu); unset: root's, mode 0711.
    migration_relay_socket_owner: str | None = Field(default=None, pattern=r"^[0-9]+:[0-9]+$")
    # How often the controller reads again every Secret it sealed for a node (Secrets are not
    # watched: that would hold every Secret of the cluster in its memory).
    seal_refresh_seconds: float = Field(default=60.0, gt=0)
    # The controller's leader election: the Lease's namespace (the controller's own; from the
    # downward API in the chart), how long a lease holds without renewal, how often it is renewed.
    controller_namespace: str = "formation-vmm"
    leader_lease_seconds: float = Field(default=15.0, gt=0)
    leader_renew_seconds: float = Field(default=5.0, gt=0)
    # Image imports on the agent: the largest download (and unpacked image) accepted, the HTTP
    # timeouts (read: the longest silence mid-transfer), how long a failed import waits before
    # it is tried again, how often progress is written, parallel imports per node, and how long
    # a cached base no VmImage or VM refers to is kept before it is removed.
    image_max_bytes: int = Field(default=64 << 30, gt=0)
    image_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    image_read_timeout_seconds: float = Field(default=60.0, gt=0)
    image_retry_seconds: float = Field(default=60.0, gt=0)
    image_progress_seconds: float = Field(default=3.0, gt=0)
    image_workers: int = Field(default=2, ge=1)
    # How many of those one namespace may hold at once (the others take turns).
    image_workers_per_namespace: int = Field(default=1, ge=1)
    image_gc_grace_seconds: float = Field(default=3600.0, ge=0)
    image_gc_interval_seconds: float = Field(default=300.0, gt=0)
    # The most this node's image cache may hold, in bytes (0: no cap): past it, bases no VM disk
    # here uses are removed, and no import starts while the bases in use fill it.
    image_cache_max_bytes: int = Field(default=0, ge=0)
    # The longest a whole download may take, however steadily bytes arrive.
    image_download_deadline_seconds: float = Field(default=3600.0, gt=0)
    # Egress policy of image downloads (images/egress.py): CIDR ranges opened despite the
    # default refusal of loopback, link-local, private and reserved space; and, if set, the
    # refused ranges instead of that default. CA certificates for https sources.
    image_egress_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    image_egress_deny: Annotated[list[str] | None, NoDecode] = None
    image_ca_file: Path | None = None
    # qemu-img on imported bytes runs sandboxed under these limits (CDI's: 1 GiB, 30 s).
    image_qemu_img_memory: int = Field(default=1 << 30, gt=0, description="a quantity such as 1Gi")
    image_qemu_img_cpu_seconds: int = Field(default=30, ge=1)
    # The replaced service's start-up gate: host:port targets to wait for before starting.
    wait_for: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("wait_for", "WAIT_FOR")
    )
    wait_for_timeout_seconds: float = Field(default=120.0, gt=0)
    # The replaced service kept its state behind this URL; the apiserver holds it now. Accepted
    # (so old deployments start) and reported as ignored.
    state_url: str | None = None

    @field_validator("reserved_memory", "image_qemu_img_memory", "node_max_memory", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return parse_quantity(value)
            except QuantityError as exc:
                raise ValueError(str(exc)) from exc
        return value

    @field_validator("image_egress_allow", "image_egress_deny", mode="before")
    @classmethod
    def _cidrs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for text in value or []:
            try:
                ipaddress.ip_network(str(text), strict=False)
            except ValueError as exc:
                raise ValueError(f"{text!r} is not a CIDR range such as 10.0.0.0/8") from exc
        return value

    @field_validator("wait_for", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for target in value or []:
            host, sep, port = str(target).rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{target!r} is not host:port")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The first source wins: flags (passed as init kwargs), then env, then the file.
        init_kwargs = getattr(init_settings, "init_kwargs", {})
        path = init_kwargs.get("config_path") or os.environ.get("VMM_CONFIG_PATH")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path:
            if not Path(path).is_file():
                raise ValueError(f"config file {path} does not exist")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def load(flags: dict[str, Any] | None = None) -> Settings:
    """Settings from file < environment < flags; flags left as None are not set."""
    return Settings(**{k: v for k, v in (flags or {}).items() if v is not None})
