# The libvirtd image the chart's libvirtd DaemonSet runs (libvirtd.enabled), for users with
# Docker; hack/build-image --libvirtd builds the same without a container engine from the same
# package list and scripts (tests/devcluster/test_libvirtd_image.py).
#   docker build -f hack/image/libvirtd.Dockerfile -t formation/vmm-libvirtd:0.1.0 .
FROM debian:bookworm-slim
COPY hack/image/libvirtd-packages /tmp/packages
RUN apt-get update \
 && grep -v '^#' /tmp/packages | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/packages
COPY hack/image/libvirtd-setup.sh hack/image/libvirtd.sh /tmp/
RUN sh /tmp/libvirtd-setup.sh
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/libvirtd.sh"]
