#!/usr/bin/env bash
# The Dockerfile's install step, run once inside the build (not part of the image afterwards).
# Every index and mirror comes from the build arguments (the environment here) or the base image:
# none is written in this repository.
#   TORCH_INDEX     an extra pip index for torch (e.g. the one serving the CUDA or +cpu wheels)
#   PIP_*           pip's own variables (PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, ...), read by pip
#   DEBIAN_MIRROR   a Debian archive for apt, replacing the base image's sources for this build
set -euo pipefail
cd /opt/distgrow
log() { printf '[docker/build] %s\n' "$*"; }

# A TLS-intercepting proxy's CA (docker/certs/): trusted by apt and pip.
if compgen -G '/usr/local/share/ca-certificates/distgrow/*.crt' >/dev/null; then
  update-ca-certificates >/dev/null
  export PIP_CERT=/etc/ssl/certs/ca-certificates.crt
fi

# TORCH_INDEX joins whatever extra indexes PIP_EXTRA_INDEX_URL already names.
if [[ -n "${TORCH_INDEX:-}" ]]; then
  export PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:+$PIP_EXTRA_INDEX_URL }$TORCH_INDEX"
fi
# ARGs without a value still arrive as empty variables; pip would read "" as an index.
for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
  [[ -n "${!name:-}" ]] || unset "$name"
done

# The build's apt sources: the mirror given, or the base image's own; the image keeps the latter.
saved=/tmp/distgrow-apt-sources
if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
  log "apt uses $DEBIAN_MIRROR for this build"
  mkdir -p "$saved"
  mv /etc/apt/sources.list /etc/apt/sources.list.d "$saved/" 2>/dev/null || true
  mkdir -p /etc/apt/sources.list.d
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" \
    >/etc/apt/sources.list
fi

# Wheels in docker/wheels/ come before any index; a Horovod wheel there skips its build.
PIP_FIND_LINKS=/opt/distgrow-wheels \
  DISTGROW_HOROVOD_WHEEL="$(find /opt/distgrow-wheels -name 'horovod-*.whl' -print -quit)" \
  bash scripts/bootstrap.sh

if [[ -d "$saved" ]]; then
  rm -rf /etc/apt/sources.list /etc/apt/sources.list.d
  mv "$saved"/* /etc/apt/
  rm -rf "$saved"
fi
rm -rf /var/lib/apt/lists/* /tmp/distgrow-wheels /opt/distgrow-wheels
