#!/usr/bin/env bash
# Sets up everything distgrow's demo and tests need on a fresh Debian machine:
# Debian packages (real data sets; Open MPI, cmake and g++ for the backends), a virtual environment
# in .venv, the pinned Python stack with the backends' packages (DeepSpeed, mpi4py, wandb),
# Horovod (launchers/install_horovod.sh: built once, 4-6 min on 2 idle cores, then a cached
# wheel), and DeepSpeed's JIT-compiled CPU collectives (built here once, 1-2 min on 2 idle cores,
# so no test pays for it). A fresh machine takes ~8-10 min idle; a second run takes ~1 s.
# Idempotent and quick on a second run: each step is skipped when its inputs have not changed.
#
#   bash scripts/bootstrap.sh            # everything
#   DISTGROW_SKIP_APT=1 bash scripts/bootstrap.sh   # no Debian packages (not root, no apt)
#   DISTGROW_SKIP_HOROVOD=1 bash scripts/bootstrap.sh   # no Horovod build (no compiler or MPI here)
#   DISTGROW_MPI4PY_FROM_SOURCE=1 ...   # compile mpi4py against the local MPI (~6 min) instead of
#                                       # PyPI's wheel (it loads the system's Open MPI/MPICH itself)
# Horovod's wheel cache: DISTGROW_WHEEL_CACHE (default ~/.cache/distgrow/wheels). DeepSpeed's ops
# go where torch puts JIT extensions: $TORCH_EXTENSIONS_DIR, default $VENV/torch_extensions (inside
# the environment, as for every distgrow process: two checkouts never rebuild them over each other).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DISTGROW_VENV:-.venv}
PY=${PYTHON:-python3}

log() { printf '[bootstrap] %s\n' "$*"; }
# pip, without the warnings this machine's pip.conf prints for every package; keeps pip's status.
pip_q() {
  local out rc=0
  out=$("$VENV/bin/pip" "$@" 2>&1) || rc=$?
  [[ -z "$out" ]] || grep -v "is ignored: it is neither a file nor a directory" <<<"$out" || true
  return "$rc"
}

# --- Debian packages -------------------------------------------------------------------------
# Fashion-MNIST; Open MPI (mpirun, and the headers Horovod builds against); the tools that build
# Horovod (cmake, make, g++) and DeepSpeed's JIT ops (g++, and a `ninja` on PATH for processes
# that run .venv/bin/python without the venv on PATH, like `make test`); pdsh (DeepSpeed's
# multi-node runner: the tests run its remote line through the real pdsh's % rewriting).
APT_PACKAGES=(dataset-fashion-mnist openmpi-bin libopenmpi-dev cmake make g++ ninja-build pdsh)
# Python headers for those builds: a pyenv/python.org interpreter has them, Debian's needs python3-dev.
"$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
  APT_PACKAGES+=(python3-dev)
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
# DISTGROW_TORCH_SPEC picks another torch build: on a GPU node, DISTGROW_TORCH_SPEC=torch==2.13.0
# (the CUDA build, as the Dockerfile's CUDA image does it); everything else keeps its pin, from
# constraints.txt without its torch line. The spec sticks to the venv ($VENV/.distgrow-torch-spec):
# a later run without it keeps that torch instead of swapping the CPU build back in.
torch_spec_file="$VENV/.distgrow-torch-spec"
if [[ -z "${DISTGROW_TORCH_SPEC:-}" && -s "$torch_spec_file" ]]; then
  DISTGROW_TORCH_SPEC=$(cat "$torch_spec_file")
  log "keeping this venv's torch: DISTGROW_TORCH_SPEC=$DISTGROW_TORCH_SPEC (from $torch_spec_file)"
fi
CONSTRAINTS=constraints.txt
if [[ -n "${DISTGROW_TORCH_SPEC:-}" ]]; then
  CONSTRAINTS="$VENV/constraints-own-torch.txt"
  grep -v '^torch==' constraints.txt >"$CONSTRAINTS"
fi
stamp="$VENV/.distgrow-installed"
want=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
[[ -z "${DISTGROW_TORCH_SPEC:-}" ]] || want="$want $DISTGROW_TORCH_SPEC"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  log "installing the pinned stack (constraints.txt) into $VENV"
  # torch first and alone, from the pinned CPU wheel, so nothing else can pull a CUDA build.
  # Which index serves it is pip's configuration (pip.conf, PIP_* variables), never this script's.
  pip_q install -q -c "$CONSTRAINTS" "${DISTGROW_TORCH_SPEC:-torch}" || {
    log "pip found no ${DISTGROW_TORCH_SPEC:-$(grep '^torch==' "$CONSTRAINTS")} on the indexes it knows:"
    log "add the index that serves it to pip's configuration (pip.conf, PIP_EXTRA_INDEX_URL;"
    log "the Docker build: --build-arg TORCH_INDEX=...) or put its wheel in PIP_FIND_LINKS"
    exit 1
  }
  # DS_BUILD_OPS=0: DeepSpeed compiles its ops when first used (JIT), not at install time.
  mpi4py_src=()
  [[ "${DISTGROW_MPI4PY_FROM_SOURCE:-0}" == 1 ]] && mpi4py_src=(--no-binary mpi4py)
  DS_BUILD_OPS=0 pip_q install -q -c "$CONSTRAINTS" ${mpi4py_src[@]+"${mpi4py_src[@]}"} \
    -e '.[dev,backends]'
  # fail here, not later, if the install broke
  "$VENV/bin/python" -c "import distgrow, torch, yaml, mpi4py, wandb, cffi, deepspeed" >/dev/null 2>&1 ||
    "$VENV/bin/python" -c "import distgrow, torch, yaml, mpi4py, wandb, cffi, deepspeed"
  echo "$want" >"$stamp"
  if [[ -n "${DISTGROW_TORCH_SPEC:-}" ]]; then
    echo "$DISTGROW_TORCH_SPEC" >"$torch_spec_file"
  else
    rm -f "$torch_spec_file"
  fi
  # Say which torch this is: a CPU build on a machine with NVIDIA GPUs cannot use them, and
  # distgrow refuses run.device=auto there (docs/launch.md, "On a GPU node").
  torch_build=$("$VENV/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda or "cpu")' 2>/dev/null || true)
  log "torch ${torch_build% *} (CUDA: ${torch_build##* })"
  gpus=$(find /dev -maxdepth 1 -regex '/dev/nvidia[0-9]+' 2>/dev/null | wc -l)
  if ((gpus > 0)) && [[ "${torch_build##* }" == cpu ]]; then
    log "this machine has $gpus NVIDIA GPU(s) but torch is a CPU build: for the GPUs, run"
    log "  DISTGROW_TORCH_SPEC=torch==2.13.0 bash scripts/bootstrap.sh"
  fi
else
  log "$VENV is up to date"
fi

# --- Horovod ---------------------------------------------------------------------------------
# Built from its sdist with a C++17 fix; the script returns in ~0.5 s when the installed horovod
# was built for this torch, and reuses its cached wheel for a new venv.
if [[ "${DISTGROW_SKIP_HOROVOD:-0}" != 1 ]]; then
  DISTGROW_VENV="$VENV" DISTGROW_CONSTRAINTS="$CONSTRAINTS" bash launchers/install_horovod.sh
fi

# --- DeepSpeed's CPU collectives -------------------------------------------------------------
# deepspeed.init_distributed() on CPU JIT-compiles deepspeed_shm_comm (1-2 min on 2 cores) into
# $TORCH_EXTENSIONS_DIR; build it once here. The cache is the environment's own (distgrow's
# processes default to the same <sys.prefix>/torch_extensions: distgrow/extensions.py), and a lock
# left by a killed build, on which every DeepSpeed job would wait forever, is named and stops here.
TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$VENV/bin/python" -c 'from distgrow.extensions import default_dir; print(default_dir())')}
export TORCH_EXTENSIONS_DIR
"$VENV/bin/python" -c 'import sys; from distgrow.extensions import check_locks
problem = check_locks(warn=lambda line: print("[bootstrap] " + line, file=sys.stderr))
sys.exit(problem and "[bootstrap] " + problem)'
ds_stamp="$VENV/.distgrow-ds-ops"
ds_want="$want ${TORCH_EXTENSIONS_DIR:-default}"
# On a CUDA accelerator DeepSpeed's collectives are NCCL's: there is no CPU op to build ("-").
ds_so=$(sed -n 2p "$ds_stamp" 2>/dev/null || true)
if [[ ! -f "$ds_stamp" || "$(head -n1 "$ds_stamp")" != "$ds_want" || ("$ds_so" != - && ! -f "$ds_so") ]]; then
  log "building DeepSpeed's JIT op deepspeed_shm_comm (1-2 min, once)"
  t0=$SECONDS
  # the venv's ninja first; with SKIP_APT there may be no other
  out=$(PATH="$(cd "$VENV/bin" && pwd):$PATH" "$VENV/bin/python" scripts/deepspeed_ops.py \
    2>"$VENV/.distgrow-ds-ops.log" | tail -n1) || {
    tail -n 30 "$VENV/.distgrow-ds-ops.log" >&2
    log "building deepspeed_shm_comm failed (log: $VENV/.distgrow-ds-ops.log); is g++ installed?"
    exit 1
  }
  case "$out" in
    "built "*)
      printf '%s\n%s\n' "$ds_want" "${out#built }" >"$ds_stamp"
      log "deepspeed_shm_comm built in $((SECONDS - t0)) s: ${out#built }"
      ;;
    "none "*)
      printf '%s\n-\n' "$ds_want" >"$ds_stamp"
      log "DeepSpeed's accelerator is ${out#none }: its collectives are NCCL's, no CPU op to build"
      ;;
    *)
      tail -n 30 "$VENV/.distgrow-ds-ops.log" >&2
      log "scripts/deepspeed_ops.py printed '$out' (log: $VENV/.distgrow-ds-ops.log)"
      exit 1
      ;;
  esac
fi
