# The coldbrew node agent image: the agent and its CLI, the FUSE view (libfuse3) and P2P
# (libtorrent). No torch: the agent moves bytes; the loader runs in model-server images.
#
#   docker build -t coldbrew-agent:0.1.0 .
#   docker tag coldbrew-agent:0.1.0 REGISTRY/coldbrew-agent:0.1.0 && docker push REGISTRY/coldbrew-agent:0.1.0
#
# Then point the DaemonSet at REGISTRY/coldbrew-agent (kustomize `images:`, see
# daemonset/overlays/example). docs/kubernetes.md has the rest.

# libfuse 3.17 (Debian 12 has 3.14), for FUSE passthrough: the library only, built by the
# same script as `./dev setup`.
FROM python:3.11-slim-bookworm AS libfuse
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev patch \
 && rm -rf /var/lib/apt/lists/*
COPY tools/build_libfuse.sh /tmp/build_libfuse.sh
RUN bash /tmp/build_libfuse.sh /opt/libfuse

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY coldbrew coldbrew
COPY agent agent
COPY fuse fuse
COPY loader loader
RUN python -m venv /opt/coldbrew \
 && /opt/coldbrew/bin/pip install --no-cache-dir ".[fuse,p2p]"

FROM python:3.11-slim-bookworm
# fuse3: fusermount3 for the preStop unmount (and libfuse3 3.14, unused: the agent loads the
# 3.17 in <venv>/libfuse). Not Debian `fuse` beside it (mfusepy would pick libfuse2).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends fuse3 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/coldbrew /opt/coldbrew
COPY --from=libfuse /opt/libfuse/libfuse3.so.4 /opt/coldbrew/libfuse/libfuse3.so.4
ENV PATH=/opt/coldbrew/bin:$PATH \
    FUSE_LIBRARY_NAME=fuse3 \
    PYTHONUNBUFFERED=1
ENTRYPOINT ["coldbrew"]
CMD ["agent", "--config", "/etc/coldbrew/coldbrew.toml"]
