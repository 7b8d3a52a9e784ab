# distgrow in a container, for cloud GPUs or a laptop. The image installs exactly what CI does:
# scripts/bootstrap.sh (Debian packages, a venv at /opt/venv, the stack pinned in constraints.txt).
#
#   docker build -t distgrow --build-arg TORCH_INDEX=<your CPU torch index> .   # CPU torch
#   docker build -t distgrow:cu130 --build-arg TORCH_SPEC=torch==2.13.0 \
#     --build-arg TORCH_INDEX=<your cu130 torch index> .                      # CUDA torch
# (TORCH_INDEX may be left out where pip's default index serves CUDA torch, as PyPI does for
# torch==2.13.0; keep CPU torch wheels out of docker/wheels/ for this build. Figures and how to
# run it on one or two cloud GPU machines: README.md, "The CUDA image on a cloud GPU machine".)
#   docker run --rm --gpus all --shm-size=8g distgrow plan configs/cifar10_wrn16_4.yaml
#   docker run --rm --gpus all --shm-size=8g -v $PWD/runs:/opt/distgrow/runs \
#     distgrow train configs/fashion_mnist_mlp.yaml
#
# BASE may be any Debian bookworm image with Python 3.11 (an air-gapped build can import one
# made with debootstrap and pass --build-arg BASE=...).
#
# No index or mirror is written here: pip and apt use what the base image and pip know, plus
# what you pass. torch==2.13.0+cpu is on no default index: pass the index that serves it (pass
# your index with --build-arg TORCH_INDEX=...), or put the wheel in docker/wheels/. The build
# machine's own pip settings go in as pip's variables, e.g.
#   --build-arg PIP_INDEX_URL="$(pip config get global.index-url)"
# and DEBIAN_MIRROR=<url> replaces the base image's apt sources for the build (restored after).
# Build arguments show in `docker history`: pass no credentials in them.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG TORCH_SPEC=""
# No defaults: an index or mirror comes from whoever builds (ARG, not ENV: the build sees them
# as environment variables, the image does not keep them).
ARG TORCH_INDEX
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
ARG DEBIAN_MIRROR
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
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
COPY docker/build.sh /opt/distgrow-build.sh

# One layer: Debian packages, the venv and the pinned stack; then drop the caches
# (docker/build.sh: certificates, wheels, the build's indexes and mirror, then bootstrap.sh).
RUN bash /opt/distgrow-build.sh && rm /opt/distgrow-build.sh \
    && /opt/venv/bin/distgrow --help >/dev/null

ENV PATH=/opt/venv/bin:${PATH}
ENTRYPOINT ["distgrow"]
CMD ["--help"]
