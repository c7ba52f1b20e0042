#!/bin/sh
# The libvirtd image's command (under tini): the chart's configuration into /etc/libvirt, then
# virtlogd and libvirtd in the foreground. QEMU runs as libvirt-qemu (qemu.conf); where the
# node has /dev/kvm, that user joins the group that owns it on the node, whatever its number.
set -eu
mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
cp /config/libvirtd.conf /config/qemu.conf /config/virtlogd.conf /etc/libvirt/
# Never the root group: that would give QEMU's user every file root's group may open.
if [ -c /dev/kvm ] && [ "$(stat -c %g /dev/kvm)" != 0 ]; then
  gid=$(stat -c %g /dev/kvm)
  group=$(awk -F: -v gid="$gid" '$3 == gid {print $1}' /etc/group)
  if [ -z "$group" ]; then
    group=node-kvm
    echo "node-kvm:x:$gid:" >> /etc/group
  fi
  grep -q "^$group:.*libvirt-qemu" /etc/group \
    || sed -i "s/^\($group:[^:]*:[^:]*:\)\(.\+\)\$/\1\2,libvirt-qemu/; s/^\($group:[^:]*:[^:]*:\)\$/\1libvirt-qemu/" /etc/group
fi
virtlogd --daemon
exec libvirtd
