# The image both the controller Deployment and the agent DaemonSet run (`vmm controller`,
# `vmm agent`). Not built in this repository's CI, which has no container engine.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc pkg-config \
      libvirt-dev libvirt-clients qemu-utils ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY operator /src/operator
RUN python3 -m venv /opt/vmm && /opt/vmm/bin/pip install --no-cache-dir /src \
 && apt-get purge -y gcc python3-dev && apt-get autoremove -y
ENV PATH=/opt/vmm/bin:$PATH
ENTRYPOINT ["vmm"]
