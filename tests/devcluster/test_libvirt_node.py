"""A node's libvirtd keeps to its own copies of libvirt's directories, even on a host where
libvirtd never ran. A cold CI machine has no /run/libvirt (libvirtd makes it on its first run,
and no systemd started one): a node's bind mount onto it failed there, the start script went
on regardless, and the node's daemon filled the host's /run/libvirt. Its QEMU pid files were
then not where the tests look, and two nodes would have shared that state."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from formation_vmm.devcluster.libvirt_node import LibvirtNode, LibvirtNodeError
from formation_vmm.devcluster.processes import ProcessTable

pytestmark = pytest.mark.libvirt

# Run in a mount namespace of its own whose /run is an empty tmpfs: the host as it is before any
# libvirtd ran, without touching the real /run (a libvirtd of this machine may be using it).
INSIDE = """
import os, sys
from pathlib import Path
from formation_vmm.devcluster.libvirt_node import LibvirtNode
from formation_vmm.devcluster.processes import ProcessTable

tmp = Path(sys.argv[1])
node = LibvirtNode(tmp / "node", "fresh", ProcessTable(tmp / "pids.json"))
node.start()
try:
    print("node:", sorted(os.listdir(tmp / "node" / "run")))
    print("host:", sorted(os.listdir("/run/libvirt")) if os.path.isdir("/run/libvirt") else None)
finally:
    node.stop()
"""


def test_a_node_on_a_host_that_never_ran_libvirtd_keeps_to_its_own_run_directory(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "a node libvirtd needs root (hack/test runs as root in CI)"
    done = subprocess.run(
        [
            "unshare", "--mount", "sh", "-c",
            'mount --make-rprivate / && mount -t tmpfs tmpfs /run && exec "$@"', "sh",
            sys.executable, "-c", INSIDE, str(tmp_path),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    # libvirtd's QEMU driver made its state directory in the node's copy ...
    assert "'qemu'" in lines["node"], done.stdout
    # ... and left the host's own (made empty, as a mount point) alone.
    assert lines["host"] == "[]", done.stdout


def test_a_socket_path_too_long_for_linux_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """libvirtd's admin socket is its longest: past Linux's limit the daemon exits, and `vmm dev
    up` used to fall back to the test driver for that node alone (a pytest directory numbered
    past 9 and a node named vm-2 were enough). Refused, naming the way out."""
    root = tmp_path / ("n" * 80)
    table = ProcessTable(tmp_path / "pids.json")
    with pytest.raises(LibvirtNodeError, match=r"a UNIX socket's path may have 107.*VMM_DEV_DIR"):
        LibvirtNode(root, "long", table).start()
    assert not root.exists()  # nothing made, nothing started
    assert table.read() == {}
