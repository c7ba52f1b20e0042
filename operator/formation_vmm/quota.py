"""A namespace's VM quota. Pure.

VMs are not pods, so Kubernetes' quota controller does not count their vCPUs, memory or disks.
An admin states the limits the Kubernetes way, in a ResourceQuota's ``spec.hard``, under our
own resource names (``vmm.formation.cloud/cpus``, ``/memory``, ``/disk``); the controller counts
the VMs bound in the namespace when it binds another, and a VM that would take the namespace
past any limit stays Pending with reason ``QuotaExceeded`` until room is made. Disk counts the
declared sizes and every Ready VmSnapshot's ``status.size`` (the bytes its overlays held when it
was taken: a snapshot keeps those blocks however the disk changes after), so snapshots cannot
grow a namespace past its disk; their number is the apiserver's
``count/vmsnapshots.vmm.formation.cloud``. The number of VMs
needs nothing from us: ``count/virtualmachines.vmm.formation.cloud`` is the apiserver's own.
"""

from dataclasses import dataclass

from formation_vmm.api.quantity import QuantityError, parse_quantity

CPUS = "vmm.formation.cloud/cpus"
MEMORY = "vmm.formation.cloud/memory"
DISK = "vmm.formation.cloud/disk"


@dataclass(frozen=True)
class Usage:
    vcpus: int = 0
    memory: int = 0
    disk: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.vcpus + other.vcpus, self.memory + other.memory, self.disk + other.disk)

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(self.vcpus - other.vcpus, self.memory - other.memory, self.disk - other.disk)


@dataclass(frozen=True)
class Quota:
    name: str  # the ResourceQuota's
    cpus: int | None = None
    memory: int | None = None
    disk: int | None = None


def quota_of(name: str, hard: dict[str, str]) -> Quota:
    """The limits of one ResourceQuota that concern VMs (the apiserver validated the quantities;
    one it did not admit counts as no limit, rather than stopping every binding)."""

    def limit(key: str) -> int | None:
        value = hard.get(key)
        if value is None:
            return None
        try:
            return parse_quantity(value)
        except QuantityError:
            return None

    return Quota(name=name, cpus=limit(CPUS), memory=limit(MEMORY), disk=limit(DISK))


def refusal(quotas: list[Quota], used: Usage, wanted: Usage) -> str | None:
    """Why a VM asking for ``wanted`` does not fit a namespace whose bound VMs use ``used``, or
    None when every quota has room."""
    after = used + wanted
    for quota in sorted(quotas, key=lambda q: q.name):
        for what, limit, total, asked, users in (
            ("vCPUs", quota.cpus, after.vcpus, wanted.vcpus, "its VMs"),
            ("memory", quota.memory, after.memory, wanted.memory, "its VMs"),
            ("disk", quota.disk, after.disk, wanted.disk, "its VMs and snapshots"),
        ):
            if limit is not None and total > limit:
                return (
                    f"ResourceQuota {quota.name} allows {_amount(what, limit)} of {what} for VMs in this "
                    f"namespace; {users} use {_amount(what, total - asked)} and this one asks for "
                    f"{_amount(what, asked)}"
                )
    return None


def _amount(what: str, value: int) -> str:
    if what == "vCPUs":
        return str(value)
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if value % size == 0 and value >= size:
            return f"{value // size}{unit}"
    return str(value)
