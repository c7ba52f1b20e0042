# The image both the controller Deployment and the agent DaemonSet run (`vmm controller`,
# `vmm agent`), for users with Docker. hack/build-image builds the same image without a
# container engine (docs/development.md); both install hack/image/packages and run
# hack/image/install.sh, so their contents are the same (tests/devcluster/test_operator_image.py).
#   docker build --build-arg VMM_COMMIT=$(git describe --always --dirty --abbrev=12) -t formation/vmm:0.1.0 .

# Wheels: the project's own (stamped with its commit) and its pinned dependencies'.
FROM debian:bookworm-slim AS wheels
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-pip python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY hack/image/requirements.txt /src/requirements.txt
ARG VMM_COMMIT=unknown
RUN echo "$VMM_COMMIT" > /src/operator/formation_vmm/_commit \
 && python3 -m venv /build && /build/bin/pip wheel --no-deps --wheel-dir /wheels /src \
 && /build/bin/pip download --no-deps --only-binary=:all: --dest /wheels --requirement /src/requirements.txt

FROM debian:bookworm-slim
COPY hack/image/packages hack/image/install.sh /tmp/image/
RUN apt-get update \
 && grep -v '^#' /tmp/image/packages | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/*
COPY --from=wheels /wheels /tmp/wheels
RUN sh /tmp/image/install.sh /tmp/wheels && rm -rf /tmp/wheels /tmp/image
ENV PATH=/opt/vmm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ENTRYPOINT ["/opt/vmm/bin/vmm"]
