#!/usr/bin/env bash
# Start virtlogd and libvirtd configured to work on these machines (no systemd; root inside a
# sandbox without cgroup delegation or mount namespaces). Idempotent.
set -euo pipefail
CONF=/etc/libvirt/qemu.conf
if [[ $(id -u) -ne 0 ]]; then
  echo "setup-libvirt: needs root to configure and start libvirtd" >&2
  exit 1
fi
# As root in a sandbox: QEMU runs as root, and libvirt must not try to use cgroups or mount
# namespaces it cannot create here.
set_conf() {
  local key="$1" value="$2"
  if grep -qE "^\s*$key\s*=" "$CONF"; then
    sed -i -E "s|^\s*$key\s*=.*|$key = $value|" "$CONF"
  else
    echo "$key = $value" >> "$CONF"
  fi
}
set_conf user '"root"'
set_conf group '"root"'
set_conf cgroup_controllers '[ ]'
set_conf namespaces '[ ]'

if ! pgrep -x virtlogd >/dev/null; then
  virtlogd -d
fi
if ! pgrep -x libvirtd >/dev/null; then
  libvirtd -d
fi
for _ in $(seq 1 50); do
  if virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "setup-libvirt: libvirtd answers on qemu:///system" >&2
    exit 0
  fi
  sleep 0.2
done
echo "setup-libvirt: libvirtd does not answer on qemu:///system" >&2
exit 1
