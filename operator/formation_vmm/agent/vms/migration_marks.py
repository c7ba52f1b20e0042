"""The agent's record, on its node's disk, of the VMs a live migration is moving out of or into
this node: it outlives a crash of the agent, so a restarted agent neither starts again a VM
whose guest went to another node ("out": its sync leaves it alone) nor removes as an orphan the
domain it prepared for a VM still bound to the source ("in")."""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from formation_vmm.host import atomic

log = logging.getLogger(__name__)

Role = Literal["in", "out"]
_UID = re.compile(r"^[0-9a-f-]{1,64}$")


@dataclass(frozen=True)
class Mark:
    vm_uid: str
    role: Role
    migration_uid: str
    namespace: str
    vm_name: str
    migration: str  # the VmMigration's name


class MigrationMarks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, vm_uid: str) -> Path:
        if not _UID.match(vm_uid):  # a uid from the API; never a path of its choosing
            raise ValueError(f"not a uid: {vm_uid!r}")
        return self.directory / f"{vm_uid}.json"

    def set(self, mark: Mark) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = {
            "role": mark.role,
            "migration": mark.migration_uid,
            "namespace": mark.namespace,
            "vm": mark.vm_name,
            "name": mark.migration,
        }
        atomic.write_bytes(self._path(mark.vm_uid), json.dumps(data).encode())

    def get(self, vm_uid: str) -> Mark | None:
        try:
            data = json.loads(self._path(vm_uid).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("role") not in ("in", "out"):
            return None
        return Mark(
            vm_uid,
            data["role"],
            str(data.get("migration", "")),
            str(data.get("namespace", "")),
            str(data.get("vm", "")),
            str(data.get("name", "")),
        )

    def role(self, vm_uid: str) -> Role | None:
        mark = self.get(vm_uid)
        return mark.role if mark is not None else None

    def clear(self, vm_uid: str, migration_uid: str) -> None:
        """Remove the mark if it is still this migration's."""
        mark = self.get(vm_uid)
        if mark is not None and mark.migration_uid == migration_uid:
            self._path(vm_uid).unlink(missing_ok=True)

    def all(self) -> list[Mark]:
        if not self.directory.is_dir():
            return []
        marks = (self.get(p.stem) for p in self.directory.glob("*.json") if _UID.match(p.stem))
        return [m for m in marks if m is not None]

    def of_migration(self, migration_uid: str, role: Role | None = None) -> list[Mark]:
        """The marks migration ``migration_uid`` left here (in ``role`` only, if given)."""
        return [m for m in self.all() if m.migration_uid == migration_uid and role in (None, m.role)]
