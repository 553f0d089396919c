# tread_scale training image: CUDA 12.6 (the CUDA of torch 2.7.0's wheels), Python 3.11, and exactly the
# versions pinned in pyproject.toml / requirements.lock (the same files `make` installs from).
#   docker build -t tread-scale .
#   docker run --gpus all --ipc=host -v $PWD/runs:/opt/tread_scale/runs tread-scale train yamls/tread_xl2.yaml key=value
# DataLoader workers and mosaicml-streaming use shared memory: give the container --ipc=host or a large
# --shm-size (e.g. 16g); Docker's default 64 MB is not enough.
ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_EXTENSIONS_DIR=/opt/torch_extensions

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (Ubuntu 22.04 universe / Debian 12), a compiler for DeepSpeed's JIT ops, tini as PID 1.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev g++ ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 tread

WORKDIR /opt/tread_scale

# Dependencies first, from the lock alone, so that code changes do not reinstall torch.
COPY requirements.lock ./
RUN python3.11 -m venv /opt/venv \
    && DS_BUILD_OPS=0 pip install -r requirements.lock

# The package itself (its pins are checked against requirements.lock by tests/test_packaging.py).
COPY pyproject.toml README.md launch.py ./
COPY tread_scale ./tread_scale
COPY yamls ./yamls
COPY slurm ./slurm
COPY docker/entrypoint.sh ./docker/entrypoint.sh
RUN pip install --no-deps . \
    && mkdir -p runs .cache /opt/torch_extensions \
    && chown -R tread:tread runs .cache /opt/torch_extensions

USER 1000:1000
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/tread_scale/docker/entrypoint.sh"]
CMD ["--help"]
