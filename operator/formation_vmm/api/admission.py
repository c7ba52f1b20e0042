"""What the controller admitted of a bound VM's spec. Pure.

A VM's spec may change after it is placed; every change of what placement, the quota and the
networks judge (vCPUs, memory, disks, interfaces) meets the same checks as a new VM before the
agent applies it (issue 26). The record is the annotation ``vmm.formation.cloud/admitted``:
the digest of those fields as admitted, and the resources the controller counts for the VM
(so a restarted controller counts what runs, not what was asked). The agent compares the digest
with the spec's: while they differ, the change is held, and the VM runs as it was admitted.
"""

import hashlib
import json
from dataclasses import dataclass

from formation_vmm.api.models import VirtualMachineSpec
from formation_vmm.api.names import ADMITTED_ANNOTATION, DEFAULT_NETWORK
from formation_vmm.api.quantity import parse_quantity


def request_digest(spec: VirtualMachineSpec) -> str:
    """The digest of what admission judges in ``spec``: a change anywhere else (runStrategy,
    probes, firmware, cloud-init) needs no admission."""
    judged = {
        "vcpus": spec.vcpus,
        "memory": spec.memory_bytes,
        "disks": [[d.name, parse_quantity(d.size) if d.size else None, d.image] for d in spec.disks],
        "networks": [
            [n.name, n.network or DEFAULT_NETWORK, (n.mac_address or "").lower()] for n in spec.networks
        ],
    }
    return hashlib.sha256(json.dumps(judged, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Admitted:
    digest: str
    vcpus: int
    memory: int
    disk: int

    def encode(self) -> str:
        return f"digest={self.digest},cpus={self.vcpus},memory={self.memory},disk={self.disk}"

    @staticmethod
    def decode(value: str | None) -> "Admitted | None":
        """The annotation read back; None when absent or malformed (only the controller writes
        it: a malformed one is not believed, and the VM is judged again)."""
        if not value:
            return None
        fields = dict(item.partition("=")[::2] for item in value.split(","))
        try:
            return Admitted(fields["digest"], int(fields["cpus"]), int(fields["memory"]), int(fields["disk"]))
        except (KeyError, ValueError):
            return None


def admitted_of(spec: VirtualMachineSpec) -> Admitted:
    """The record of admitting ``spec`` as it is."""
    return Admitted(request_digest(spec), spec.vcpus, spec.memory_bytes, spec.disk_bytes)


def change_held(annotations: dict[str, str], spec: VirtualMachineSpec) -> bool:
    """Whether the spec asks for more than the controller admitted (a digest that differs). A
    VM with no record at all was bound before records existed: nothing is held for it (the
    controller writes its record at once); only the controller may set or remove the record."""
    if ADMITTED_ANNOTATION not in annotations:
        return False
    admitted = Admitted.decode(annotations[ADMITTED_ANNOTATION])
    return admitted is None or admitted.digest != request_digest(spec)
