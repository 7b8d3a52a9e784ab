#!/usr/bin/env bash
# Builds Horovod 0.28.1 (PyTorch + Gloo + MPI, CPU operations on Gloo; GPU operations on NCCL
# when torch is a CUDA build) from its PyPI sdist and installs it into a virtual environment that
# already has torch.
#
# Horovod 0.28.1 (its last release) forces C++14, and torch >= 2.1 needs C++17; CXXFLAGS cannot
# override it, so this script patches `set(CMAKE_CXX_STANDARD 14)` to 17 in the two CMakeLists.txt
# files before building. The built wheel is cached, keyed by (horovod, torch, Python, CPU arch,
# MPI flavour), so only the first run on a machine compiles (4-6 min on 2 idle cores, far longer
# on a busy machine); later runs, and other venvs with the same torch, reuse the cached wheel.
#
#   bash launchers/install_horovod.sh            # build (or reuse the cached wheel), install, verify
#   bash launchers/install_horovod.sh --force    # rebuild even if installed or cached
#   bash launchers/install_horovod.sh --verify   # only run the checks on what is installed
#
# Environment (all optional):
#   DISTGROW_VENV            venv to install into (default: the active $VIRTUAL_ENV, else ./.venv)
#   DISTGROW_WHEEL_CACHE     wheel cache (default: $HOME/.cache/distgrow/wheels); build logs in logs/
#   DISTGROW_CONSTRAINTS     pip constraints file (default: the repository's constraints.txt)
#   DISTGROW_HOROVOD_WHEEL   install this prebuilt wheel instead of building (e.g. in a Dockerfile)
#   DISTGROW_HOROVOD_SDIST   build from this local horovod-0.28.1.tar.gz instead of downloading it
#   DISTGROW_HOROVOD_MPI=0   build without MPI (Gloo only; no MPI headers needed)
#   DISTGROW_HOROVOD_GPU     auto (default): HOROVOD_GPU_OPERATIONS=NCCL when torch is a CUDA
#                            build and the CUDA toolkit (nvcc) is found, else a CPU-only build that
#                            says so; 1: NCCL or fail; 0: CPU-only. NCCL comes from
#                            HOROVOD_NCCL_HOME, else the venv's nvidia-nccl package (torch's own).
#   DISTGROW_BUILD_JOBS      parallel compile jobs (default: CPUs, fewer if RAM < 2.5 GB a job)
#   DISTGROW_KEEP_BUILD=1    keep the build tree (its path is printed)
#   DISTGROW_SKIP_APT=1      never apt-get install missing build tools, only report them
# pip's own PIP_* variables (PIP_INDEX_URL, PIP_NO_INDEX, PIP_FIND_LINKS...) are honoured.
set -euo pipefail
set -E # the ERR trap below also in functions: an unexpected failure never exits silently
trap 'printf "[install_horovod] ERROR: failed (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

HOROVOD_VERSION=0.28.1
# sha256 of horovod-0.28.1.tar.gz as published on PyPI (checked before building).
HOROVOD_SDIST_SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
VENV=${DISTGROW_VENV:-${VIRTUAL_ENV:-.venv}}
CACHE=${DISTGROW_WHEEL_CACHE:-$HOME/.cache/distgrow/wheels}
CONSTRAINTS=${DISTGROW_CONSTRAINTS:-$repo/constraints.txt}
WITH_MPI=${DISTGROW_HOROVOD_MPI:-1}
# One compile job per CPU, but no more than memory allows: a torch-including TU takes ~2.5 GB.
default_jobs() {
  local n mem_kb
  n=$(nproc 2>/dev/null || echo 2)
  mem_kb=$(sed -n 's/^MemAvailable: *\([0-9]*\) kB/\1/p' /proc/meminfo 2>/dev/null || true)
  if [[ -n "$mem_kb" ]] && ((mem_kb / 2621440 < n)); then n=$((mem_kb / 2621440)); fi
  echo $((n < 1 ? 1 : n))
}
JOBS=${DISTGROW_BUILD_JOBS:-$(default_jobs)}

force=0
verify_only=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --verify) verify_only=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "install_horovod.sh: unknown argument '$arg' (try --help)" >&2
      exit 2
      ;;
  esac
done

log() { printf '[install_horovod] %s\n' "$*"; }
die() {
  printf '[install_horovod] ERROR: %s\n' "$*" >&2
  exit 1
}
# Drops the warning this kind of machine's pip.conf prints for every package, keeps pip's status.
pip_q() {
  local out rc=0
  out=$("$PY" -m pip --disable-pip-version-check "$@" 2>&1) || rc=$?
  [[ -z "$out" ]] || grep -v "is ignored: it is neither a file nor a directory" <<<"$out" || true
  return "$rc"
}
# timeout(1) where there is one (coreutils), so a hung check cannot hang the script.
with_timeout() { if command -v timeout >/dev/null 2>&1; then timeout "$@"; else shift; "$@"; fi; }
constraint_args=()
[[ -f "$CONSTRAINTS" ]] && constraint_args=(-c "$CONSTRAINTS")

# --- the venv and its torch ------------------------------------------------------------------
[[ -x "$VENV/bin/python" ]] || die "no virtual environment at '$VENV'. Create one and install torch
  first, e.g.  python3 -m venv .venv && .venv/bin/pip install -c constraints.txt torch
  or point DISTGROW_VENV at an existing one (bash scripts/bootstrap.sh does all of this)."
VENV=$(cd "$VENV" && pwd)
PY="$VENV/bin/python"
# The build (cmake, mpicxx wrappers) and horovodrun find tools on PATH: put the venv's first.
export PATH="$VENV/bin:$PATH"

# What the cache key needs, from the venv's interpreter: package metadata only, no `import torch`
# (5-10 s on a busy 2-core machine), so the already-installed path stays instant.
info=$("$PY" - <<'EOF' 2>/dev/null
import os, platform, sys, sysconfig
from importlib import metadata
def version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"
inc = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
print(version("torch"), version("horovod"), f"cp{sys.version_info[0]}{sys.version_info[1]}",
      platform.machine(), int(inc), sys.base_prefix)
EOF
) || die "could not run $PY"
read -r TORCH_VERSION INSTALLED_HVD PYTAG ARCH HAVE_PY_HEADERS PY_BASE <<<"$info"
[[ "$TORCH_VERSION" != - ]] || die "torch is not installed in $VENV: install it first (Horovod
  compiles against it), e.g.  $VENV/bin/pip install -c constraints.txt torch"

# GPU operations: NCCL where torch is a CUDA build (a CPU-only Horovod cannot reduce CUDA tensors:
# "Requested ReadyEvent with GPU device but not compiled with CUDA").
WANT_GPU=${DISTGROW_HOROVOD_GPU:-auto}
WITH_GPU=0
NVCC=$(command -v nvcc 2>/dev/null || true)
[[ -z "$NVCC" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]] && NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
case "$WANT_GPU" in
  0) ;;
  1)
    [[ "$TORCH_VERSION" == *+cu* ]] || die "DISTGROW_HOROVOD_GPU=1 but torch $TORCH_VERSION is not a CUDA build"
    [[ -n "$NVCC" ]] || die "DISTGROW_HOROVOD_GPU=1 but no CUDA toolkit (nvcc on PATH or in \$CUDA_HOME/bin)"
    WITH_GPU=1
    ;;
  auto)
    if [[ "$TORCH_VERSION" == *+cu* ]]; then
      if [[ -n "$NVCC" ]]; then
        WITH_GPU=1
      else
        log "torch $TORCH_VERSION is a CUDA build but no CUDA toolkit (nvcc) is here: this Horovod"
        log "is CPU-only and cannot train on GPUs (distgrow refuses backend.name=horovod on CUDA)."
        log "For GPUs: install the CUDA toolkit, then DISTGROW_HOROVOD_GPU=1 bash $0 --force"
      fi
    fi
    ;;
  *) die "DISTGROW_HOROVOD_GPU=$WANT_GPU: use auto, 1 or 0" ;;
esac

# The MPI flavour is part of the key: a wheel built against Open MPI does not load against MPICH.
mpi_id=nompi
if [[ "$WITH_MPI" == 1 ]]; then
  mpi_id=unknown-mpi
  if command -v mpirun >/dev/null 2>&1; then
    mpi_id=$(mpirun --version 2>/dev/null | sed -n '1{s/^mpirun //; s/[^A-Za-z0-9.]\{1,\}//g; p}' || true)
    mpi_id=${mpi_id:-unknown-mpi}
  fi
fi
KEY="horovod-${HOROVOD_VERSION}_torch-${TORCH_VERSION}_${PYTAG}_${ARCH}_${mpi_id}"
((WITH_GPU)) && KEY="${KEY}_nccl"
STAMP="$VENV/.distgrow-horovod"

# --- verification --------------------------------------------------------------------------
verify() {
  local out n
  log "verifying: import horovod.torch; hvd.init(); hvd.size()"
  if ! out=$(cd / && with_timeout 120 "$PY" -c \
    'import horovod.torch as hvd; hvd.init(); print("size", hvd.size()); hvd.shutdown()' 2>&1); then
    printf '%s\n' "$out" | tail -n 20 >&2
    return 1
  fi
  n=$(sed -n 's/^size //p' <<<"$out" | tail -n1)
  [[ "$n" == 1 ]] || {
    printf '%s\n' "$out" | tail -n 20 >&2
    return 1
  }
  if ((WITH_GPU)); then
    log "verifying: hvd.cuda_built() and hvd.nccl_built()"
    out=$(cd / && with_timeout 120 "$PY" -c \
      'import horovod.torch as hvd; print("gpu", int(bool(hvd.cuda_built() and hvd.nccl_built())))' 2>&1) || true
    [[ "$(sed -n 's/^gpu //p' <<<"$out" | tail -n1)" == 1 ]] || {
      printf '%s\n' "$out" | tail -n 20 >&2
      log "this horovod was built without CUDA/NCCL"
      return 1
    }
  fi
  log "verifying: horovodrun --check-build"
  out=$(cd / && with_timeout 120 "$VENV/bin/horovodrun" --check-build 2>&1) || {
    printf '%s\n' "$out" >&2
    return 1
  }
  local want=(PyTorch Gloo)
  [[ "$WITH_MPI" == 1 ]] && want+=(MPI)
  ((WITH_GPU)) && want+=(NCCL)
  for w in "${want[@]}"; do
    grep -q "\[X\] $w" <<<"$out" || {
      printf '%s\n' "$out" >&2
      log "horovodrun --check-build does not list $w"
      return 1
    }
  done
  log "horovod $HOROVOD_VERSION works in $VENV: hvd.init() ok, --check-build lists ${want[*]}"
}

if ((verify_only)); then
  verify || die "horovod is not working in $VENV (run without --verify to (re)install it)"
  exit 0
fi

# --- fast path: already installed for this torch ---------------------------------------------
# The stamp is written only after the checks below passed, and records the key (torch version...)
# the installed wheel was built for. --verify runs the checks again.
if ((!force)) && [[ "$INSTALLED_HVD" == "$HOROVOD_VERSION" && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
  log "horovod $HOROVOD_VERSION is already installed in $VENV (built for torch $TORCH_VERSION)"
  exit 0
fi

# --- prerequisites ---------------------------------------------------------------------------
# Tools a build needs; each missing one is mapped to the Debian packages that provide it.
missing_tools=()
missing_pkgs=()
need() { # need <description> <debian packages...>  (called when the check failed)
  missing_tools+=("$1")
  shift
  missing_pkgs+=("$@")
}
check_prereqs() {
  missing_tools=()
  missing_pkgs=()
  local tmp
  tmp=$(mktemp -d)
  command -v cmake >/dev/null 2>&1 || need cmake cmake
  command -v make >/dev/null 2>&1 || need make make
  if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
    need "C++ compiler (${CXX:-g++})" g++
  else
    printf '#include <optional>\nint main(){std::optional<int> x; return x.value_or(0);}\n' >"$tmp/t.cc"
    "${CXX:-g++}" -std=c++17 -o "$tmp/t" "$tmp/t.cc" >/dev/null 2>&1 ||
      need "C++17 compiler (${CXX:-g++} cannot compile -std=c++17; g++ >= 7 needed)" g++
  fi
  if [[ "$HAVE_PY_HEADERS" != 1 ]]; then
    need "Python headers (Python.h) for the interpreter in $PY_BASE" python3-dev
  fi
  if [[ "$WITH_MPI" == 1 ]]; then
    command -v mpirun >/dev/null 2>&1 || need "MPI launcher (mpirun)" openmpi-bin
    printf '#include <mpi.h>\nint main(int c,char**v){MPI_Init(&c,&v);MPI_Finalize();return 0;}\n' >"$tmp/m.cc"
    if ! command -v mpicxx >/dev/null 2>&1; then
      need "MPI C++ compiler wrapper and headers (mpicxx, mpi.h)" libopenmpi-dev
    elif ! mpicxx -o "$tmp/m" "$tmp/m.cc" >/dev/null 2>&1; then
      need "MPI development files (mpicxx cannot compile #include <mpi.h>)" libopenmpi-dev
    fi
  fi
  rm -rf "$tmp"
  ((${#missing_tools[@]} == 0))
}

# Checked before a build only: installing a cached or prebuilt wheel needs none of these.
ensure_build_prereqs() {
  check_prereqs && return 0
  local pkgs
  mapfile -t pkgs < <(printf '%s\n' "${missing_pkgs[@]}" | sort -u)
  [[ "$WITH_MPI" == 1 ]] && [[ " ${pkgs[*]} " == *" libopenmpi-dev "* ]] && pkgs+=(openmpi-bin)
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
  log "missing build prerequisites: $(printf '%s\n' "${missing_tools[@]}" | paste -sd';' - | sed 's/;/; /g')"
  if [[ $(id -u) -eq 0 && "${DISTGROW_SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null 2>&1; then
    log "apt-get install ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
    check_prereqs || die "still missing after apt-get install: $(printf '%s\n' "${missing_tools[@]}" | paste -sd';' - | sed 's/;/; /g')"
  else
    {
      echo "Install them, then run this script again. On Debian/Ubuntu, as root:"
      echo "    apt-get update && apt-get install -y --no-install-recommends ${pkgs[*]}"
      echo "Elsewhere: cmake can come from PyPI ($VENV/bin/pip install cmake); on a cluster, load"
      echo "the compiler and MPI modules (e.g. 'module load gcc openmpi') so g++, mpicxx and mpirun"
      echo "are on PATH; or set DISTGROW_HOROVOD_MPI=0 to build Horovod with Gloo only."
    } >&2
    exit 1
  fi
}

mkdir -p "$CACHE/logs"
CACHE=$(cd "$CACHE" && pwd)
wheel_dir="$CACHE/$KEY"
LOGFILE="$CACHE/logs/$KEY.log"

# Serialise concurrent runs on the same cache (parallel CI jobs, several venvs): the second one
# waits and then finds the wheel the first one built.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/.lock-$KEY"
  flock 9
fi

WORKDIRS=()
cleanup() { for d in ${WORKDIRS[@]+"${WORKDIRS[@]}"}; do rm -rf "$d"; done; }
trap cleanup EXIT

# --- build -----------------------------------------------------------------------------------
build_failed() {
  local why=$1
  {
    echo
    echo "================ Horovod $HOROVOD_VERSION build FAILED: $why ================"
    echo "--- last 40 lines of the build log ($LOGFILE) ---"
    tail -n 40 "$LOGFILE" 2>/dev/null || true
    # The compiler's or cmake's own words sit far above pip's traceback: show the first of them.
    local first
    first=$(grep -nE 'error:|fatal error|CMake Error|Error [0-9]+|\*\*\* ' "$LOGFILE" 2>/dev/null |
      grep -vE 'subprocess-exited-with-error|Failed (building|to build)|errors? (detected|generated)' |
      head -n 15 | cut -c1-300 || true)
    if [[ -n "$first" ]]; then
      echo "--- the first errors in the log (line: text) ---"
      printf '%s\n' "$first"
    fi
    echo "--- end of log excerpts; the full log is $LOGFILE ---"
    echo
    echo "What this looks like:"
    local hit=0
    if grep -qE "mpi\.h: No such file|Could NOT find MPI|MPI_CXX.*NOTFOUND|HOROVOD_WITH_MPI.*MPI is not" "$LOGFILE" 2>/dev/null; then
      echo "  * MPI development files were not found: install libopenmpi-dev (or load your cluster's"
      echo "    MPI module so mpicxx is on PATH), or set DISTGROW_HOROVOD_MPI=0 for a Gloo-only build."
      hit=1
    fi
    if grep -qE "C\+\+17|std=c\+\+14|is not a member of .std|requires.*-std=|if constexpr" "$LOGFILE" 2>/dev/null; then
      echo "  * A C++ standard problem: torch >= 2.1 needs C++17. Check that the CMAKE_CXX_STANDARD"
      echo "    patch applied (the log shows -std=c++17 on the compile lines) and g++ >= 7."
      hit=1
    fi
    if grep -qE "Killed signal terminated program|cc1plus: out of memory|virtual memory exhausted" "$LOGFILE" 2>/dev/null; then
      echo "  * The compiler ran out of memory: retry with DISTGROW_BUILD_JOBS=1."
      hit=1
    fi
    if grep -qE "No module named 'torch'|Could not find.*Pytorch|HOROVOD_WITH_PYTORCH.*not" "$LOGFILE" 2>/dev/null; then
      echo "  * torch was not found by the build: it must be importable from $PY."
      hit=1
    fi
    if grep -qiE "Could not find a version|No matching distribution|Connection|Name or service not known|HTTPError" "$LOGFILE" 2>/dev/null; then
      echo "  * A download failed: PyPI must be reachable (or set DISTGROW_HOROVOD_SDIST to a local sdist)."
      hit=1
    fi
    ((hit)) || echo "  (no known pattern matched; read the log)"
    echo "Usual causes: missing MPI headers (libopenmpi-dev), a torch version this fix was not tested"
    echo "with (tested: 2.13.0; this build used $TORCH_VERSION), the C++ standard (C++17 needed),"
    echo "or too little memory for $JOBS parallel compiles."
    echo "Retry:  DISTGROW_BUILD_JOBS=1 DISTGROW_KEEP_BUILD=1 bash $here/install_horovod.sh --force"
  } >&2
  exit 1
}

# NCCL for the build: HOROVOD_NCCL_HOME, else the venv's nvidia-nccl package (what torch's CUDA
# wheels load), laid out as include/ and lib/libnccl.so (the package ships only libnccl.so.2).
nccl_home() {
  if [[ -n "${HOROVOD_NCCL_HOME:-}" ]]; then
    echo "$HOROVOD_NCCL_HOME"
    return
  fi
  local pkg
  pkg=$("$PY" -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__) if nvidia.nccl.__file__ else list(nvidia.nccl.__path__)[0])' 2>/dev/null) ||
    die "no NCCL for the GPU build: set HOROVOD_NCCL_HOME, or install torch's nvidia-nccl package"
  mkdir -p "$1/nccl/lib"
  ln -sfn "$pkg/include" "$1/nccl/include"
  ln -sf "$pkg/lib/libnccl.so.2" "$1/nccl/lib/libnccl.so"
  ln -sf "$pkg/lib/libnccl.so.2" "$1/nccl/lib/libnccl.so.2"
  echo "$1/nccl"
}

build_wheel() {
  local work sdist src t0
  work=$(mktemp -d "${TMPDIR:-/tmp}/distgrow-horovod.XXXXXX")
  if [[ "${DISTGROW_KEEP_BUILD:-0}" == 1 ]]; then
    log "keeping the build tree: $work"
  else
    WORKDIRS+=("$work")
  fi
  ensure_build_prereqs
  : >"$LOGFILE"
  t0=$SECONDS

  "$PY" -c "import torch" >/dev/null 2>&1 ||
    die "torch is installed in $VENV but does not import: $("$PY" -c "import torch" 2>&1 | tail -n1)"
  # 0. what setup.py imports and lists in setup_requires, in the venv (no build isolation).
  log "installing horovod's build dependencies (setuptools cffi cloudpickle psutil pyyaml packaging)"
  pip_q install -q ${constraint_args[@]+"${constraint_args[@]}"} \
    setuptools cffi cloudpickle psutil pyyaml packaging ||
    die "pip could not install horovod's build dependencies into $VENV (see above)"

  # 1. the sdist: a local file, the cache, or PyPI.
  sdist="$CACHE/sdist/horovod-$HOROVOD_VERSION.tar.gz"
  if [[ -n "${DISTGROW_HOROVOD_SDIST:-}" ]]; then
    sdist=$DISTGROW_HOROVOD_SDIST
    [[ -f "$sdist" ]] || die "DISTGROW_HOROVOD_SDIST=$sdist does not exist"
  elif [[ ! -f "$sdist" ]]; then
    log "downloading the horovod $HOROVOD_VERSION sdist from PyPI"
    mkdir -p "$work/dl" "$CACHE/sdist"
    # --no-build-isolation: pip reads the sdist's metadata with the venv's setuptools (faster).
    "$PY" -m pip --disable-pip-version-check download --no-deps --no-binary :all: \
      --no-build-isolation -d "$work/dl" "horovod==$HOROVOD_VERSION" >>"$LOGFILE" 2>&1 ||
      build_failed "could not download horovod==$HOROVOD_VERSION from PyPI"
    mv "$work/dl/horovod-$HOROVOD_VERSION.tar.gz" "$sdist.tmp.$$" && mv "$sdist.tmp.$$" "$sdist"
  fi
  if [[ "$(sha256sum "$sdist" | cut -d' ' -f1)" != "$HOROVOD_SDIST_SHA256" ]]; then
    [[ -z "${DISTGROW_HOROVOD_SDIST:-}" ]] && rm -f "$sdist"
    die "$sdist does not have the sha256 of the horovod $HOROVOD_VERSION sdist on PyPI ($HOROVOD_SDIST_SHA256)"
  fi

  # 2. unpack and patch the C++ standard (torch >= 2.1 headers need C++17).
  tar -xzf "$sdist" -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  if grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" ||
    ! grep -q 'set(CMAKE_CXX_STANDARD 17)' "$src/horovod/torch/CMakeLists.txt"; then
    build_failed "the C++17 patch did not apply to the CMakeLists.txt files"
  fi

  # 3. compile.
  local -a feature_env=(HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_TENSORFLOW=1
    HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=gloo)
  if [[ "$WITH_MPI" == 1 ]]; then feature_env+=(HOROVOD_WITH_MPI=1); else feature_env+=(HOROVOD_WITHOUT_MPI=1); fi
  if ((WITH_GPU)); then
    local nccl
    nccl=$(nccl_home "$work") || exit 1
    feature_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
      HOROVOD_NCCL_HOME="$nccl" HOROVOD_NCCL_LINK=SHARED)
  fi
  log "building horovod $HOROVOD_VERSION against torch $TORCH_VERSION ($PYTAG, $mpi_id, $JOBS jobs);" \
    "4-6 min on 2 idle cores; log: $LOGFILE"
  {
    echo "# $(date -u +%FT%TZ) building $KEY"
    echo "# ${feature_env[*]} MAKEFLAGS=-j$JOBS"
    echo "# $("${CXX:-g++}" --version | sed -n 1p); $(cmake --version | sed -n 1p)"
  } >>"$LOGFILE"
  mkdir -p "$work/wheel"
  (
    cd "$src"
    env "${feature_env[@]}" MAKEFLAGS="-j$JOBS" \
      "$PY" -m pip --disable-pip-version-check wheel -v --no-build-isolation --no-deps \
      -w "$work/wheel" .
  ) >>"$LOGFILE" 2>&1 || build_failed "pip wheel exited with an error"
  local whl
  whl=$(find "$work/wheel" -name "horovod-$HOROVOD_VERSION-*.whl" | sed -n 1p)
  [[ -n "$whl" ]] || build_failed "pip wheel produced no wheel"

  # 4. into the cache, atomically (a half-copied wheel must never look valid).
  mkdir -p "$wheel_dir"
  cp "$whl" "$wheel_dir/.tmp.$$" && mv "$wheel_dir/.tmp.$$" "$wheel_dir/$(basename "$whl")"
  {
    echo "key: $KEY"
    echo "built: $(date -u +%FT%TZ) on $(uname -n) in $((SECONDS - t0)) s"
    echo "compiler: $("${CXX:-g++}" --version | sed -n 1p)"
    echo "flags: ${feature_env[*]}"
  } >"$wheel_dir/BUILD-INFO"
  log "built $(basename "$whl") in $((SECONDS - t0)) s; cached in $wheel_dir"
}

find_cached() {
  [[ -d "$wheel_dir" ]] || return 0
  find "$wheel_dir" -maxdepth 1 -name "horovod-$HOROVOD_VERSION-*.whl" | sed -n 1p
}

install_wheel() {
  log "installing $(basename "$1") into $VENV"
  # --force-reinstall --no-deps replaces a same-version horovod built for another torch; the
  # second call adds its runtime dependencies (cffi cloudpickle psutil pyyaml packaging).
  if ! pip_q install -q ${constraint_args[@]+"${constraint_args[@]}"} --force-reinstall --no-deps "$1" ||
    ! pip_q install -q ${constraint_args[@]+"${constraint_args[@]}"} "$1"; then
    die "pip could not install $1 into $VENV"
  fi
}

built_now=0
if [[ -n "${DISTGROW_HOROVOD_WHEEL:-}" ]]; then
  [[ -f "$DISTGROW_HOROVOD_WHEEL" ]] || die "DISTGROW_HOROVOD_WHEEL=$DISTGROW_HOROVOD_WHEEL does not exist"
  wheel=$DISTGROW_HOROVOD_WHEEL
else
  if ((force)); then rm -rf "$wheel_dir"; fi
  wheel=$(find_cached)
  if [[ -n "$wheel" ]]; then
    log "using the cached wheel $wheel"
  else
    build_wheel
    built_now=1
    wheel=$(find_cached)
  fi
fi

rm -f "$STAMP"
install_wheel "$wheel"
if ! verify; then
  if ((built_now)) || [[ -n "${DISTGROW_HOROVOD_WHEEL:-}" ]]; then
    die "horovod was installed from $wheel but does not work (output above). Build log: $LOGFILE"
  fi
  log "the cached wheel does not work here; discarding it and building afresh"
  rm -rf "$wheel_dir"
  build_wheel
  wheel=$(find_cached)
  install_wheel "$wheel"
  verify || die "horovod was built and installed but does not work (output above). Build log: $LOGFILE"
fi
echo "$KEY" >"$STAMP"
log "done: horovod $HOROVOD_VERSION in $VENV (wheel: $wheel)"
