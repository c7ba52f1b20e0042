"""What a VM's cloud-init seed (the agent's ISO) holds."""

import io
from pathlib import Path

import pycdlib


def seed_user_data(seed: Path) -> str:
    """The user-data file of the seed ISO at ``seed``."""
    iso = pycdlib.PyCdlib()
    iso.open(str(seed))
    try:
        buf = io.BytesIO()
        iso.get_file_from_iso_fp(buf, joliet_path="/user-data")
    finally:
        iso.close()
    return buf.getvalue().decode()
