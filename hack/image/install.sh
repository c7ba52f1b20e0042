#!/bin/sh
# Runs inside the image being built (the Dockerfile's RUN, hack/build-image's chroot): installs
# formation-vmm and its Python dependencies from a directory of wheels into /opt/vmm, offline.
# The venv sees Debian's site-packages for the libvirt binding (python3-libvirt); pip and
# setuptools are removed from it afterwards, as nothing in the image installs anything later.
set -eu
wheels=$1
python3 -m venv --system-site-packages /opt/vmm
/opt/vmm/bin/pip install --quiet --no-index --no-cache-dir --find-links "$wheels" formation-vmm
/opt/vmm/bin/pip uninstall --quiet --yes pip setuptools
# The kubernetes client ships a second, asyncio copy of itself (kubernetes.aio, 68 MiB, half the
# image's Python) that nothing here imports; kopf talks to the API through aiohttp.
rm -rf /opt/vmm/lib/python3.*/site-packages/kubernetes/aio
# What `vmm --version` reports must be what was installed, and the binding must load.
/opt/vmm/bin/vmm --version
/opt/vmm/bin/python -c "import libvirt, kopf, formation_vmm.run, formation_vmm.agent.hypervisor"
