"""The sandbox qemu-img runs in on imported images, tried with real programs: it reads only
what it is handed (and the system it runs from), writes only its scratch directory, connects
nowhere, and stays within its memory and CPU limits."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from formation_vmm.host import sandbox
from formation_vmm.host.qemu_img import QemuImgError
from tests.support import image_files as files
from tests.support.image_server import ImageServer, serve

pytestmark = pytest.mark.host


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageServer]:
    root = tmp_path / "served"
    root.mkdir()
    (root / "page").write_text("reached\n")
    with serve(root) as srv:
        yield srv


def test_landlock_is_there() -> None:
    assert sandbox.landlock_abi() >= 4  # filesystem and TCP rules


def test_it_reads_what_it_is_handed_and_nothing_else(tmp_path: Path) -> None:
    image = files.convert(files.raw(tmp_path / "a.raw"), tmp_path / "a.qcow2", "qcow2")
    secret = tmp_path / "token"
    secret.write_text("not for images")
    out = sandbox.run(["info", "--output=json", "-f", "qcow2", str(image)], [image], None, sandbox.Limits())
    assert '"format": "qcow2"' in out
    with pytest.raises(QemuImgError, match="Permission denied"):
        sandbox.run(["info", "-f", "raw", str(secret)], [image], None, sandbox.Limits())
    cat = sandbox.run_program("/usr/bin/cat", [str(image)], [image], None, sandbox.Limits())
    assert cat  # handed: readable
    with pytest.raises(QemuImgError, match="Permission denied"):
        sandbox.run_program("/usr/bin/cat", ["/etc/passwd"], [image], None, sandbox.Limits())


def test_it_writes_only_its_scratch_directory(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sandbox.run_program("/usr/bin/touch", [str(scratch / "ok")], [], scratch, sandbox.Limits(file_size=1))
    assert (scratch / "ok").exists()
    with pytest.raises(QemuImgError, match="Permission denied"):
        sandbox.run_program("/usr/bin/touch", [str(tmp_path / "outside")], [], scratch, sandbox.Limits())
    assert not (tmp_path / "outside").exists()


def test_it_connects_nowhere(server: ImageServer) -> None:
    url = server.url("/files/page")
    assert subprocess.run(["curl", "-fsS", url], capture_output=True, check=True).stdout == b"reached\n"
    with pytest.raises(QemuImgError, match="curl"):
        sandbox.run_program("/usr/bin/curl", ["-fsS", "--max-time", "5", url], [], None, sandbox.Limits())
    assert server.requests == ["/files/page"]  # only the unsandboxed curl got through


def test_its_limits_hold(tmp_path: Path) -> None:
    with pytest.raises(QemuImgError, match="SIGXCPU"):
        sandbox.run_program("/usr/bin/yes", [], [], None, sandbox.Limits(cpu_seconds=1))
    with pytest.raises(QemuImgError):  # 16 MiB of address space: not even its libraries load
        sandbox.run(["--version"], [], None, sandbox.Limits(memory=16 << 20))
