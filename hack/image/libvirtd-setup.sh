#!/bin/sh
# Runs inside the libvirtd image being built (hack/build-image --libvirtd's chroot, the RUN of
# libvirtd.Dockerfile), after hack/image/libvirtd-packages are installed.
set -eu
# QEMU's user, as Debian's libvirt-daemon-system makes it (that package would also bring
# systemd units and polkit, which a container has no use for).
echo 'libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin' >> /etc/passwd
echo 'libvirt-qemu:x:64055:' >> /etc/group
# QEMU's user must traverse to the VMs' files, mounted at their paths on the node; under /root
# (a development cluster's), the image's own /root (0700) would stop it.
chmod 0711 /root
install -m 0755 /tmp/libvirtd.sh /usr/local/bin/libvirtd.sh
rm /tmp/libvirtd.sh /tmp/libvirtd-setup.sh
