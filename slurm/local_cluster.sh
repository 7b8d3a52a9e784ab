#!/usr/bin/env bash
# A real one-node SLURM cluster (slurmctld + slurmd + munged) in a private directory, for tests
# and for trying distgrow's SLURM path on a laptop. Nothing is installed system-wide except the
# Debian packages; every file (config, state, spool, logs, pid files, munge key and socket) lives
# under $DISTGROW_SLURM_DIR, and the daemons use their own ports.
#
#   bash slurm/local_cluster.sh start    # installs slurm-wlm + munge if missing (root + apt-get)
#   source "${DISTGROW_SLURM_DIR:-/tmp/distgrow-slurm}/env.sh"   # SLURM_CONF for sbatch/srun
#   sbatch --wait --wrap 'srun --ntasks=2 hostname'
#   bash slurm/local_cluster.sh status
#   bash slurm/local_cluster.sh stop     # stops the daemons this script started, nothing else
#
# Settings (environment):
#   DISTGROW_SLURM_DIR        where everything lives (default /tmp/distgrow-slurm)
#   DISTGROW_SLURM_PORT       slurmctld's port; slurmd uses the next one (default 16817)
#   DISTGROW_SLURM_CPUS       CPUs the node advertises (default: nproc). More than the machine
#                             has is allowed (config_overrides), so 4 tasks fit on 2 cores.
#   DISTGROW_SLURM_NO_INSTALL set to 1 to fail instead of running apt-get
#
# Exit status: 0 on success; 3 when SLURM is missing and cannot be installed (not root, no
# apt-get, or DISTGROW_SLURM_NO_INSTALL=1), so a caller can tell "unavailable" from "broken".
set -euo pipefail

DIR=${DISTGROW_SLURM_DIR:-/tmp/distgrow-slurm}
PORT=${DISTGROW_SLURM_PORT:-16817}
CPUS=${DISTGROW_SLURM_CPUS:-$(nproc)}
PACKAGES=(slurm-wlm munge)
EXIT_UNAVAILABLE=3

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

find_bin() { # slurmctld and slurmd live in /usr/sbin, which is not on every user's PATH
  command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || true
}

ensure_installed() {
  local missing=()
  for bin in slurmctld slurmd munged sbatch; do
    [[ -n $(find_bin "$bin") ]] || missing+=("$bin")
  done
  ((${#missing[@]} == 0)) && return 0
  if [[ ${DISTGROW_SLURM_NO_INSTALL:-0} == 1 || $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "missing ${missing[*]}: install the Debian packages ${PACKAGES[*]} as root"
    log "(apt-get install ${PACKAGES[*]}), then run this again"
    exit "$EXIT_UNAVAILABLE"
  fi
  log "installing ${PACKAGES[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's postinst scripts try to start the daemons with the system config; stop them from
  # starting anything (exit 101 = "action forbidden"): only this script's daemons should run.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && created_policy=1
  fi
  apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >"$DIR/apt.log" 2>&1 || {
    apt-get update -q >>"$DIR/apt.log" 2>&1 &&
      apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1
  } || { ((created_policy)) && rm -f "$policy"; die "apt-get failed; see $DIR/apt.log"; }
  ((created_policy)) && rm -f "$policy"
  return 0
}

pid_alive() { # pid file -> 0 when its process runs
  [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_config() {
  local host
  host=$(hostname -s)
  mkdir -p "$DIR"/{state,spool,log,run,munge}
  # munged refuses a socket directory that others may write to, and clients need to reach it.
  chmod 755 "$DIR" "$DIR/munge"
  if [[ ! -s $DIR/munge/munge.key ]]; then
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  fi
  chmod 400 "$DIR/munge/munge.key"
  cat >"$DIR/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster. Do not use in production.
ClusterName=distgrow
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${PORT}
SlurmdPort=$((PORT + 1))
SlurmUser=$(id -un)
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (120 s by
# default): 10 s keeps pre-emption tests short.
AuthInfo=socket=${DIR}/munge/munge.socket.2,cred_expire=10
CredType=cred/munge
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
# No systemd or cgroups here: track processes by their parent ids, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Let the node advertise DISTGROW_SLURM_CPUS even when the machine has fewer cores.
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd here, so no sacct: SLURM's own completion records (one line per finished job,
# with its start, end, nodes, CPUs and TRES) go to a text file, which distgrow report reads
# for the hours each job held (distgrow/held.py).
JobCompType=jobcomp/filetxt
JobCompLoc=${DIR}/log/jobcomp.txt
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# Quick reactions for tests: signals and requeues are seen within a second or two.
MessageTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=${host} CPUs=${CPUS} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  cat >"$DIR/env.sh" <<EOF
# Source this to talk to the local test cluster (slurm/local_cluster.sh).
export SLURM_CONF=${DIR}/slurm.conf
EOF
}

start() {
  mkdir -p "$DIR"
  ensure_installed
  if pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid"; then
    log "already running in $DIR"
    cat "$DIR/env.sh"
    return 0
  fi
  stop_daemons quiet
  write_config
  local munged slurmctld slurmd
  munged=$(find_bin munged)
  slurmctld=$(find_bin slurmctld)
  slurmd=$(find_bin slurmd)
  "$munged" --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" ||
    die "munged did not start; see $DIR/log/munged.log"
  export SLURM_CONF=$DIR/slurm.conf
  # -c: a fresh controller state on every start (no jobs left over from an earlier run).
  "$slurmctld" -c -f "$SLURM_CONF" || die "slurmctld did not start; see $DIR/log/slurmctld.log"
  "$slurmd" -N localhost -f "$SLURM_CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
  local sinfo state=""
  sinfo=$(command -v sinfo || echo /usr/bin/sinfo)
  for _ in $(seq 1 100); do # up to 20 s; ~1 s is typical
    state=$("$sinfo" -h -N -o '%T' 2>/dev/null | head -1 || true)
    [[ $state == idle* || $state == mixed* || $state == allocated* ]] && break
    sleep 0.2
  done
  if [[ $state != idle* && $state != mixed* && $state != allocated* ]]; then
    log "the node did not come up (state '${state:-none}'); logs in $DIR/log:"
    tail -n 5 "$DIR"/log/*.log >&2 || true
    exit 1
  fi
  log "up in $DIR (node localhost, ${CPUS} CPUs, slurmctld port ${PORT})"
  cat "$DIR/env.sh"
}

stop_daemons() {
  local quiet=${1:-}
  # Only processes whose pid files this script's config names: never another cluster's daemons.
  for name in slurmd slurmctld munged; do
    local pidfile=$DIR/run/$name.pid
    if pid_alive "$pidfile"; then
      local pid
      pid=$(cat "$pidfile")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do # up to 10 s
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
      [[ -n $quiet ]] || log "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
  done
}

status() {
  local rc=0
  for name in munged slurmctld slurmd; do
    if pid_alive "$DIR/run/$name.pid"; then
      echo "$name: running (pid $(cat "$DIR/run/$name.pid"))"
    else
      echo "$name: stopped"
      rc=1
    fi
  done
  if ((rc == 0)); then
    SLURM_CONF=$DIR/slurm.conf sinfo -N -o '%N %T %c' 2>/dev/null || true
  fi
  return "$rc"
}

case "${1:-}" in
start) start ;;
stop) stop_daemons ;;
status) status ;;
*)
  echo "usage: $0 start|stop|status   (files under \$DISTGROW_SLURM_DIR, default /tmp/distgrow-slurm)" >&2
  exit 2
  ;;
esac
