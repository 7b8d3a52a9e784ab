# distgrow in a container, for cloud GPUs or a laptop. The image installs exactly what CI does:
# scripts/bootstrap.sh (Debian packages, a venv at /opt/venv, the stack pinned in constraints.txt).
#
#   docker build -t distgrow .                                    # CPU build of torch
#   docker build -t distgrow:cu130 \
#     --build-arg TORCH_SPEC=torch==2.13.0 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .   # CUDA build of torch
#   docker run --rm --gpus all --shm-size=8g distgrow plan configs/cifar10_wrn16_4.yaml
#   docker run --rm --gpus all --shm-size=8g -v $PWD/runs:/opt/distgrow/runs \
#     distgrow train configs/fashion_mnist_mlp.yaml
#
# BASE may be any Debian bookworm image with Python 3.11 (an air-gapped build can import one
# made with debootstrap and pass --build-arg BASE=...).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_SPEC=""
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_EXTRA_INDEX_URL=${TORCH_INDEX} \
    DISTGROW_VENV=/opt/venv \
    DISTGROW_TORCH_SPEC=${TORCH_SPEC} \
    DISTGROW_WHEEL_CACHE=/tmp/distgrow-wheels \
    WANDB_MODE=offline \
    OMPI_ALLOW_RUN_AS_ROOT=1 \
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

WORKDIR /opt/distgrow
COPY pyproject.toml constraints.txt README.md ./
COPY scripts ./scripts
COPY launchers ./launchers
COPY distgrow ./distgrow
COPY configs ./configs
COPY slurm ./slurm

# Wheels for an offline or faster build (docker/wheels/README.md): pip prefers them, and a
# Horovod wheel there is installed instead of building Horovod from source. CA certificates in
# docker/certs/ (a TLS-intercepting proxy's) are trusted by apt and pip during the build.
COPY docker/wheels /opt/distgrow-wheels
COPY docker/certs /usr/local/share/ca-certificates/distgrow

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# One layer: Debian packages, the venv and the pinned stack; then drop the caches.
RUN if compgen -G '/usr/local/share/ca-certificates/distgrow/*.crt' >/dev/null; then \
        update-ca-certificates >/dev/null && export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; \
    fi \
    && PIP_FIND_LINKS=/opt/distgrow-wheels \
    DISTGROW_HOROVOD_WHEEL="$(find /opt/distgrow-wheels -name 'horovod-*.whl' -print -quit)" \
    bash scripts/bootstrap.sh \
    && rm -rf /var/lib/apt/lists/* /tmp/distgrow-wheels /opt/distgrow-wheels \
    && /opt/venv/bin/distgrow --help >/dev/null

ENV PATH=/opt/venv/bin:${PATH}
ENTRYPOINT ["distgrow"]
CMD ["--help"]
