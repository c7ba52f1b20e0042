"""A real guest small enough to boot on TCG in seconds: Debian's cloud kernel and an initramfs
holding busybox, Debian's qemu-guest-agent (with the shared libraries it links) and an /init
this module writes. The initramfs is built here, from the packages hack/install-system-deps.sh
installs (linux-image-cloud-amd64, busybox-static, qemu-guest-agent). `vmm dev up` boots its
sample VM from these, and the real-guest tests do too."""

import gzip
import io
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

# What /init prints first, so a test can find it in the serial console log.
BOOT_MARKER = "formation-vmm guest: /init running"
POWEROFF_MARKER = "formation-vmm guest: powering off"
# With vmm.disk=1, /init reads a counter from the first disk (/dev/vda), prints it, and writes
# it back plus one: a disk whose contents a test can follow through snapshots and restores.
DISK_SAYS = "formation-vmm guest: disk says"
DISK_NOW = "formation-vmm guest: disk now"
# With vmm.tick=1, /init prints this every second with a counter kept in memory and the kernel's
# boot id: a guest resumed (restored, migrated) goes on counting under the same boot id, a
# guest booted again starts over under a new one.
TICK = "formation-vmm guest: tick"
# With vmm.dirty=N, /init rewrites N MiB of its memory (a tmpfs file) with random data over and
# over, printing this after each pass: a guest whose memory keeps changing, as a busy one's does,
# so a live migration has pages to send again.
DIRTY = "formation-vmm guest: dirtied"
# With vmm.net=1, /init brings eth0 up with DHCP (udhcpc), prints the address it got, and serves
# HTTP on port 80 (busybox httpd); vmm.httpd_for=N stops the server after N seconds,
# vmm.spoof=A/P replaces the address DHCP gave with another, vmm.spoofmac=M the interface's MAC;
# vmm.fetch=A fetches http://A/ (A:P from port P; A,B:P,... each in turn)
# every 2 s (at most 2 s each) and prints whether it got through.
ADDRESS = "formation-vmm guest: address"
HTTPD_STOPPED = "formation-vmm guest: httpd stopped"
FETCHED = "formation-vmm guest: fetched"
# With vmm.ga=1, /init starts qemu-guest-agent on its virtio-serial port (org.qemu.guest_agent.0).
GUEST_AGENT = "formation-vmm guest: guest agent"
QEMU_GA = Path("/usr/sbin/qemu-ga")
# The virtio modules /dev/vda and eth0 need (Debian's cloud kernel builds them as modules), in
# load order, under the kernel's module tree.
VIRTIO_MODULES = (
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "drivers/block/virtio_blk",
    "net/core/failover",
    "drivers/net/net_failover",
    "drivers/net/virtio_net",
    "drivers/char/virtio_console",
)
# udhcpc's event script: the lease's address, prefix and router on the interface.
DHCP_EVENT = """#!/bin/busybox sh
case "$1" in
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then ip route add default via "${router%% *}" dev "$interface"; fi
    ;;
esac
"""

INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "{BOOT_MARKER}"
# vmm.poweroff=N on the kernel command line: power the machine off after N seconds, the way a
# guest OS shuts itself down.
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vmm.poweroff=*) delay="${{arg#vmm.poweroff=}}" ;;
    vmm.disk=*) disk="${{arg#vmm.disk=}}" ;;
    vmm.tick=*) tick="${{arg#vmm.tick=}}" ;;
    vmm.net=*) net="${{arg#vmm.net=}}" ;;
    vmm.httpd_for=*) httpd_for="${{arg#vmm.httpd_for=}}" ;;
    vmm.spoof=*) spoof="${{arg#vmm.spoof=}}" ;;
    vmm.spoofmac=*) spoofmac="${{arg#vmm.spoofmac=}}" ;;
    vmm.fetch=*) fetch="${{arg#vmm.fetch=}}" ;;
    vmm.ga=*) ga="${{arg#vmm.ga=}}" ;;
    vmm.dirty=*) dirty="${{arg#vmm.dirty=}}" ;;
  esac
done
if [ -n "$disk" ] || [ -n "$net" ] || [ -n "$ga" ]; then
  for m in /lib/modules/*.ko; do insmod "$m" 2>/dev/null; done
fi
if [ -n "$ga" ]; then
  mount -t devtmpfs devtmpfs /dev 2>/dev/null
  mkdir -p /tmp /run /var/run
  port=""
  i=0
  while [ -z "$port" ] && [ $i -lt 100 ]; do
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port="/dev/${{p##*/}}"
    done
    [ -z "$port" ] && sleep 0.1
    i=$((i+1))
  done
  if [ -n "$port" ] && [ -x /usr/sbin/qemu-ga ]; then
    /usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /tmp -f /tmp/qga.pid &
    echo "{GUEST_AGENT} on $port"
  else
    echo "{GUEST_AGENT} none (port '$port')"
  fi
fi
if [ -n "$net" ]; then
  ip link set lo up
  ip link set eth0 up
  if udhcpc -i eth0 -s /bin/dhcp-event -q -n -t 30 -T 1 >/dev/null 2>&1; then
    echo "{ADDRESS} $(ip -4 -o addr show dev eth0 | awk '{{print $4}}')"
  else
    echo "{ADDRESS} none"
  fi
  if [ -n "$spoof" ]; then
    ip addr flush dev eth0
    ip addr add "$spoof" dev eth0
    echo "{ADDRESS} $spoof (spoofed)"
  fi
  if [ -n "$spoofmac" ]; then
    ip link set eth0 down
    ip link set eth0 address "$spoofmac"
    ip link set eth0 up
    echo "{ADDRESS} $(ip -4 -o addr show dev eth0 | awk '{{print $4}}') (mac spoofed $spoofmac)"
  fi
  mkdir -p /www
  echo "hello from $(cat /proc/sys/kernel/random/boot_id)" > /www/index.html
  httpd -f -p 80 -h /www &
  httpd_pid=$!
  if [ -n "$httpd_for" ]; then
    ( sleep "$httpd_for"; kill "$httpd_pid"; echo "{HTTPD_STOPPED}" ) &
  fi
  if [ -n "$fetch" ]; then
    ( while true; do
        for target in $(echo "$fetch" | tr ',' ' '); do
          host="${{target%%:*}}"
          port=80
          case "$target" in *:*) port="${{target##*:}}" ;; esac
          # nc, not wget: busybox-static's wget crashes in Debian's build.
          got=$(printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 2 "$host" "$port" 2>/dev/null | grep '^hello from')
          if [ -n "$got" ]; then
            echo "{FETCHED} $target ok: $got"
          else
            echo "{FETCHED} $target failed"
          fi
        done
        sleep 2
      done ) &
  fi
fi
if [ -n "$disk" ]; then
  mount -t devtmpfs devtmpfs /dev 2>/dev/null
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  if [ ! -b /dev/vda ]; then echo "{DISK_SAYS} no disk"; disk=""; fi
fi
if [ -n "$disk" ]; then
  said=$(dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -d '\\000' | head -n 1)
  echo "{DISK_SAYS} [$said]"
  n="${{said#count=}}"
  case "$n" in ''|*[!0-9]*) n=0 ;; esac
  n=$((n + 1))
  printf 'count=%s\\n' "$n" | dd of=/dev/vda bs=64 count=1 conv=sync,fsync 2>/dev/null
  sync
  echo "{DISK_NOW} count=$n"
fi
if [ -n "$delay" ]; then
  sleep "$delay"
  echo "{POWEROFF_MARKER}"
  poweroff -f
fi
case "$dirty" in ''|*[!0-9]*) dirty="" ;; esac
if [ -n "$dirty" ]; then
  mount -t devtmpfs devtmpfs /dev 2>/dev/null
  mkdir -p /dirty
  mount -t tmpfs -o size=$((dirty + 2))m tmpfs /dirty
  dd if=/dev/urandom of=/dirty/block bs=1M count=1 2>/dev/null
  ( pass=0
    while true; do
      i=0
      while [ $i -lt "$dirty" ]; do
        dd if=/dirty/block of=/dirty/memory bs=1M seek=$i count=1 conv=notrunc 2>/dev/null
        i=$((i + 1))
      done
      pass=$((pass + 1))
      echo "{DIRTY} $dirty MiB, pass $pass"
    done ) &
fi
if [ -n "$tick" ]; then
  boot=$(cat /proc/sys/kernel/random/boot_id)
  n=0
  while true; do n=$((n + 1)); echo "{TICK} $n boot $boot"; sleep 1; done
fi
while true; do sleep 3600; done
"""


def ticks(console_log: Path) -> list[tuple[int, str]]:
    """(counter, boot id) of each tick line a guest booted with vmm.tick=1 wrote to its log."""
    return ticks_in(console_log.read_text(errors="replace"))


def ticks_in(console: str) -> list[tuple[int, str]]:
    """(counter, boot id) of each tick line in a guest's console output."""
    found = []
    for line in console.splitlines():
        words = line.removeprefix(TICK).split()
        # The last line may be half written while the guest prints it: only whole ones count.
        if line.startswith(TICK) and len(words) == 3 and words[0].isdigit() and words[1] == "boot":
            found.append((int(words[0]), words[2]))
    return found


def bare_domain_xml(
    name: str,
    uid: str,
    kernel: Path,
    initrd: Path,
    disk: Path,
    console_log: Path,
    memory_mib: int,
    cmdline: str,
) -> str:
    """A minimal domain for this guest, for tests and benchmarks that drive libvirt without the
    agent: one vCPU, QEMU's TCG, the qcow2 ``disk`` as vda, the serial console into a file."""
    return f"""<domain type='qemu'><name>{name}</name><uuid>{uid}</uuid>
<memory unit='MiB'>{memory_mib}</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>{kernel}</kernel><initrd>{initrd}</initrd>
<cmdline>console=ttyS0 {cmdline}</cmdline></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
<serial type='file'><source path='{console_log}' append='on'/><target port='0'/></serial>
</devices></domain>"""


def kernel() -> Path:
    found = sorted(Path("/boot").glob("vmlinuz-*-cloud-amd64"))
    if not found:
        raise FileNotFoundError("no Debian cloud kernel in /boot: install linux-image-cloud-amd64")
    return found[-1]


def _cpio_entry(name: str, mode: int, data: bytes, ino: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One entry of a cpio archive in the 'newc' format the kernel unpacks."""
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
    blob = header + name.encode() + b"\0"
    blob += b"\0" * (-len(blob) % 4)
    blob += data
    blob += b"\0" * (-len(blob) % 4)
    return blob


def _modules() -> list[tuple[str, int, bytes]]:
    """The virtio modules of the kernel ``kernel()`` returns, numbered in load order (the /init
    loop loads them in name order), decompressed if Debian shipped them xz'd."""
    version = kernel().name.removeprefix("vmlinuz-")
    base = Path("/lib/modules") / version / "kernel"
    found = []
    for index, module in enumerate(VIRTIO_MODULES):
        plain, packed = base / f"{module}.ko", base / f"{module}.ko.xz"
        if plain.exists():
            data = plain.read_bytes()
        elif packed.exists():
            data = lzma.decompress(packed.read_bytes())
        else:
            continue  # built in, or absent: the guest boots without a disk then
        found.append((f"lib/modules/{index:02d}-{module.rsplit('/', 1)[1]}.ko", stat.S_IFREG | 0o644, data))
    return found


def _guest_agent() -> list[tuple[str, int, bytes]]:
    """qemu-ga and the shared libraries it links (as ldd finds them on this machine), at the
    same paths in the guest; nothing when qemu-guest-agent is not installed."""
    if not QEMU_GA.exists():
        return []
    out = subprocess.run(["ldd", str(QEMU_GA)], capture_output=True, text=True, check=True).stdout  # noqa: S603, S607
    files = [QEMU_GA]
    for line in out.splitlines():
        found = next((word for word in line.split() if word.startswith("/")), None)
        if found is not None:
            files.append(Path(found))
    entries: list[tuple[str, int, bytes]] = []
    dirs = {"lib"}  # in the initramfs already
    for path in files:
        resolved = path.resolve()
        for parent in reversed(path.parents[:-1]):
            if str(parent) not in dirs:
                dirs.add(str(parent))
                entries.append((str(parent).lstrip("/"), stat.S_IFDIR | 0o755, b""))
        entries.append((str(path).lstrip("/"), stat.S_IFREG | 0o755, resolved.read_bytes()))
    return entries


def build_initramfs(dest: Path) -> Path:
    """Write a gzip'd newc cpio with /bin/busybox and /init to ``dest``."""
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    if not busybox.exists():
        raise FileNotFoundError("no busybox binary: install busybox-static")
    entries = [
        ("lib", stat.S_IFDIR | 0o755, b""),
        ("lib/modules", stat.S_IFDIR | 0o755, b""),
        *_modules(),
        ("bin", stat.S_IFDIR | 0o755, b""),
        ("proc", stat.S_IFDIR | 0o755, b""),
        ("sys", stat.S_IFDIR | 0o755, b""),
        ("dev", stat.S_IFDIR | 0o755, b""),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        ("bin/dhcp-event", stat.S_IFREG | 0o755, DHCP_EVENT.encode()),
        *_guest_agent(),
        ("init", stat.S_IFREG | 0o755, INIT.encode()),
    ]
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate(entries, start=1):
        out.write(_cpio_entry(name, mode, data, ino))
    # The kernel gives /init this console as stdout: without it, nothing reaches the serial log.
    out.write(_cpio_entry("dev/console", stat.S_IFCHR | 0o600, b"", len(entries) + 1, rdev=(5, 1)))
    out.write(_cpio_entry("TRAILER!!!", 0, b"", 0))
    dest.write_bytes(gzip.compress(out.getvalue(), compresslevel=1))
    return dest


def install(images_dir: Path, subdir: str = "guest") -> tuple[Path, Path]:
    """Put the kernel and a fresh initramfs under ``images_dir/subdir``; returns both paths."""
    target = images_dir / subdir
    target.mkdir(parents=True, exist_ok=True)
    vmlinuz = target / "vmlinuz"
    shutil.copyfile(kernel(), vmlinuz)
    return vmlinuz, build_initramfs(target / "initrd.gz")


def main(argv: list[str] | None = None) -> None:
    """``python -m formation_vmm.devcluster.guest IMAGES_DIR [SUBDIR]``: the sample VM's kernel
    and initramfs onto a node (standard library only, so it runs from a plain checkout on a node
    with python3, Debian's cloud kernel and busybox: the CI workflow's kind node)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        raise SystemExit("usage: python -m formation_vmm.devcluster.guest IMAGES_DIR [SUBDIR]")
    for path in install(Path(args[0]), *args[1:]):
        print(path)


if __name__ == "__main__":
    main()
