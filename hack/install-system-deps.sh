#!/usr/bin/env bash
# Install the Debian packages Formation VMM and its tests need (idempotent; root required to
# install, a no-op when everything is present).
set -euo pipefail
PACKAGES=(
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config gcc
  python3-venv python3-dev
  qemu-system-x86 qemu-utils
  # UEFI firmware for firmware: {type: efi} VMs.
  ovmf
  # A real guest for the boot tests: Debian's cloud kernel, and busybox for the initramfs.
  linux-image-cloud-amd64 busybox-static cpio
  # The QEMU guest agent, copied into the test guest's initramfs (guestAgentPing probes).
  qemu-guest-agent
  # The Debian 12 test guest's disk image (formation_vmm/devcluster/debian_image.py), built
  # without loop devices: mmdebstrap, an ext4 from a directory, a FAT ESP by mtools, GRUB's
  # BIOS and UEFI images.
  mmdebstrap fdisk e2fsprogs dosfstools mtools grub-pc-bin grub-efi-amd64-bin
  # The container image the chart runs, built without a container engine
  # (formation_vmm/devcluster/operator_image.py): OCI layers by umoci, the archive by skopeo.
  umoci skopeo
  # A real node for `helm install` (formation_vmm/devcluster/kube_node.py): the container
  # runtime and the CNI plugins; kubelet and kube-proxy are built like the apiserver.
  containerd runc containernetworking-plugins
  dnsmasq-base iproute2 curl ca-certificates git
)
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-system-deps: missing Debian packages: ${missing[*]}; run this script as root" >&2
  exit 1
fi
echo "install-system-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
