"""Write a NoCloud seed ISO (volume ``cidata``) with pycdlib, atomically."""

import io
import os
from pathlib import Path

import pycdlib

from formation_vmm.domain.cloudinit import SEED_VOLUME_ID


def _iso_name(name: str) -> str:
    # ISO9660 level-1 names are 8.3 upper case; cloud-init reads the Joliet/Rock Ridge names.
    stem = name.replace("-", "")[:8].upper()
    return f"/{stem}.;1"


def write_seed(path: Path, files: dict[str, str]) -> None:
    """Create the seed ISO at ``path`` (replacing an older one only once the new one is whole)."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=SEED_VOLUME_ID)
    for name, text in sorted(files.items()):
        data = text.encode()
        iso.add_fp(io.BytesIO(data), len(data), _iso_name(name), rr_name=name, joliet_path=f"/{name}")
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as out:
        iso.write_fp(out)
        out.flush()
        os.fsync(out.fileno())
    iso.close()
    os.replace(tmp, path)
