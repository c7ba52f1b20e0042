"""Process configuration: a YAML file, then ``VMM_*`` environment variables, then flags.

The variable names are those of the REST ``vmm-service`` this project replaces, so existing
deployments keep their settings. Precedence from low to high: defaults, the file named by
``VMM_CONFIG_PATH`` (or ``--config``), environment variables, command-line flags.
"""

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the controller and the agent; each has a ``VMM_`` environment variable."""

    model_config = SettingsConfigDict(env_prefix="VMM_", extra="ignore")

    config_path: Path | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    api_port: int = Field(default=3003, ge=0, le=65535, description="health, metrics and debug HTTP port")
    api_host: str = "0.0.0.0"  # noqa: S104 - probes come from the kubelet, not from loopback
    vm_dir: Path = Path("/run/form-vm")
    images_dir: Path = Path("/var/lib/formation/vm-images")
    # VM disks outlive reboots, so they are not under vm_dir (a tmpfs on most hosts).
    disks_dir: Path = Path("/var/lib/formation/vm-disks")
    kernel_path: Path | None = None
    libvirt_uri: str = "qemu:///system"
    domain_type: Literal["kvm", "qemu", "test"] = "kvm"
    # The agent's node; in a DaemonSet it comes from the downward API (spec.nodeName).
    node_name: str | None = None
    # Namespaces to watch; empty means the whole cluster.
    namespaces: list[str] = Field(default_factory=list)
    # Placement: what the agent keeps back for the host, and how far the controller may overcommit.
    reserved_cpus: int = Field(default=0, ge=0)
    reserved_memory: str = "0"
    cpu_overcommit: float = Field(default=1.0, gt=0)
    memory_overcommit: float = Field(default=1.0, gt=0)
    # How often the agent refreshes its heartbeat and capacity on the Node, and how long the
    # controller waits without one before it calls the node's VMs Unknown.
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    # How often the agent compares every domain with its VM (drift, orphans, IP addresses).
    resync_seconds: float = Field(default=15.0, gt=0)
    # The address other machines reach this agent's API at (defaults to http://<node>:<port>).
    advertise_url: str | None = None
    node_lost_seconds: float = Field(default=40.0, gt=0)
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
    image_gc_grace_seconds: float = Field(default=3600.0, ge=0)
    image_gc_interval_seconds: float = Field(default=300.0, gt=0)

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
        return (init_settings, env_settings, _YamlFileSource(settings_cls, path))


class _YamlFileSource(PydanticBaseSettingsSource):
    """Settings from a YAML mapping whose keys are the settings' names (``vm_dir: /run/vms``)."""

    def __init__(self, settings_cls: type[BaseSettings], path: str | Path | None) -> None:
        super().__init__(settings_cls)
        self.path = Path(path) if path else None

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping at once

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        data = yaml.safe_load(self.path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: the config file must hold a mapping of setting names to values")
        return {str(k).replace("-", "_"): v for k, v in data.items()}


def load(flags: dict[str, Any] | None = None) -> Settings:
    """Settings from file < environment < flags; flags left as None are not set."""
    return Settings(**{k: v for k, v in (flags or {}).items() if v is not None})
