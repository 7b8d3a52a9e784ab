#!/usr/bin/env bash
# Sets up everything distgrow's demo and tests need on a fresh Debian machine:
# Debian packages (real data sets), a virtual environment in .venv, and the pinned Python stack.
# Idempotent and quick on a second run: each step is skipped when its inputs have not changed.
#
#   bash scripts/bootstrap.sh            # everything
#   DISTGROW_SKIP_APT=1 bash scripts/bootstrap.sh   # no Debian packages (not root, no apt)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTGROW_VENV:-.venv}
PY=${PYTHON:-python3}

log() { printf '[bootstrap] %s\n' "$*"; }
# pip, without the warnings this machine's pip.conf prints for every package; keeps pip's status.
pip_q() {
  local out rc=0
  out=$("$VENV/bin/pip" "$@" 2>&1) || rc=$?
  grep -v "is ignored: it is neither a file nor a directory" <<<"$out" || true
  return "$rc"
}

# --- Debian packages -------------------------------------------------------------------------
APT_PACKAGES=(dataset-fashion-mnist openmpi-bin)  # the real data set; mpirun for the launch tests
if [[ "${DISTGROW_SKIP_APT:-0}" != 1 ]]; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
      log "missing Debian packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})"
      log "or set DISTGROW_SKIP_APT=1 to go on without them (tests needing them will say so)"
      exit 1
    fi
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- Python environment ----------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.distgrow-installed"
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  log "installing the pinned stack (constraints.txt) into $VENV"
  # torch first and alone, from the pinned CPU wheel, so nothing else can pull a CUDA build.
  pip_q install -q -c constraints.txt torch
  pip_q install -q -c constraints.txt -e '.[dev]'
  "$VENV/bin/python" -c "import distgrow, torch, yaml" # fail here, not later, if the install broke
  echo "$want" >"$stamp"
else
  log "$VENV is up to date"
fi
