"""What ``qemu-img info --output=json`` says of one file (no backing chain). Pure."""

import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DiskInfo:
    """What ``qemu-img info --output=json`` says of one file (no backing chain)."""

    format: str
    virtual_size: int
    actual_size: int
    backing: str | None
    # qemu-img's "format-specific" block: VMDK extents and create type, qcow2 data-file, ...
    specific: dict[str, Any]


def parse_info(text: str) -> DiskInfo:
    data: Any = json.loads(text)
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    specific = data.get("format-specific") or {}
    return DiskInfo(
        format=str(data["format"]),
        virtual_size=int(data["virtual-size"]),
        actual_size=int(data.get("actual-size") or 0),
        backing=str(backing) if backing else None,
        specific=dict(specific.get("data") or {}) if isinstance(specific, dict) else {},
    )
