#!/usr/bin/env bash
# A SLURM cluster in containers (tests/test_two_nodes.py): run inside the distgrow-slurm image.
# Every container mounts one volume at /shared (the cluster's "NFS"): slurm.conf, the munge key,
# the logs and the jobs' folders live there; state and sockets stay in each container.
#
#   distgrow-slurm conf CTL_NAME CTL_IP NAME:IP [NAME:IP ...]   # once: slurm.conf, munge key
#   distgrow-slurm controller                                   # on CTL_NAME: munged, slurmctld
#   distgrow-slurm node NAME                                    # on each compute node: slurmd
#   distgrow-slurm wait N                                       # until N nodes are idle (30 s)
#   distgrow-slurm ssh                                          # sshd, root's key from /shared
#
# Settings that work without systemd or cgroups (INFRA.md): proctrack/linuxproc, task/none,
# select/cons_tres, a private munge socket, all state under /var/spool/distgrow-slurm. Job
# completion records go to /shared/slurm/log/jobcomp.txt (jobcomp/filetxt, no slurmdbd): the
# chain mode's test reads each span's size and node list there, as `distgrow report` does.
set -euo pipefail
SHARED=/shared/slurm
LOCAL=/var/spool/distgrow-slurm
MUNGE_SOCKET=$LOCAL/munge/munge.socket.2
CPUS=${DISTGROW_SLURM_CPUS:-$(nproc)}

log() { printf '[distgrow-slurm %s] %s\n' "$(hostname)" "$*" >&2; }

conf() {
  local ctl_name=$1 ctl_ip=$2 names=() entry
  shift 2
  mkdir -p "$SHARED/log"
  chmod 755 "$SHARED"
  [[ -s $SHARED/munge.key ]] || dd if=/dev/urandom of="$SHARED/munge.key" bs=1024 count=1 status=none
  chmod 400 "$SHARED/munge.key"
  {
    cat <<CONF
ClusterName=distgrow
SlurmctldHost=${ctl_name}(${ctl_ip})
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=${MUNGE_SOCKET},cred_expire=10
CredType=cred/munge
StateSaveLocation=${LOCAL}/state
SlurmdSpoolDir=${LOCAL}/spool
SlurmctldPidFile=${LOCAL}/run/slurmctld.pid
SlurmdPidFile=${LOCAL}/run/slurmd.pid
SlurmctldLogFile=${SHARED}/log/slurmctld.log
SlurmdLogFile=${SHARED}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=${SHARED}/log/jobcomp.txt
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
MessageTimeout=10
KillWait=5
InactiveLimit=0
MinJobAge=300
CONF
    for entry in "$@"; do
      names+=("${entry%%:*}")
      echo "NodeName=${entry%%:*} NodeAddr=${entry#*:} CPUs=${CPUS} State=UNKNOWN"
    done
    local IFS=,
    echo "PartitionName=debug Nodes=${names[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"
  } >"$SHARED/slurm.conf.new"
  mv "$SHARED/slurm.conf.new" "$SHARED/slurm.conf"
  log "wrote $SHARED/slurm.conf: controller $ctl_name ($ctl_ip), nodes $*"
}

munge() {
  mkdir -p "$LOCAL"/{state,spool,run,munge}
  chmod 755 "$LOCAL/munge" # munged insists on it
  cp "$SHARED/munge.key" "$LOCAL/munge/munge.key"
  chmod 400 "$LOCAL/munge/munge.key"
  munged --force --socket="$MUNGE_SOCKET" --key-file="$LOCAL/munge/munge.key" \
    --pid-file="$LOCAL/run/munged.pid" --log-file="$SHARED/log/munged-$(hostname).log" \
    --seed-file="$LOCAL/munge/munged.seed"
}

controller() {
  munge
  slurmctld -c || { tail -n 20 "$SHARED/log/slurmctld.log" >&2; exit 1; }
  log "slurmctld started"
}

node() {
  munge
  slurmd -N "$1" || { tail -n 20 "$SHARED/log/slurmd-$1.log" >&2; exit 1; }
  log "slurmd $1 started"
}

wait_idle() {
  local want=$1 idle=0
  for _ in $(seq 1 150); do
    idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | grep -c . || true)
    ((idle >= want)) && { log "$idle node(s) idle"; return 0; }
    sleep 0.2
  done
  log "only $idle of $want node(s) came up idle:"
  sinfo -N -l >&2 || true
  tail -n 5 "$SHARED"/log/*.log >&2 || true
  exit 1
}

# Passwordless ssh between the containers as root (the remote shell of horovodrun, mpirun and
# DeepSpeed's pdsh runner): one key pair on /shared, made by the first container that asks.
ssh_setup() {
  mkdir -p "$SHARED/ssh" /root/.ssh
  chmod 700 /root/.ssh
  if [[ ! -s $SHARED/ssh/id_ed25519 ]]; then
    ssh-keygen -q -t ed25519 -N '' -f "$SHARED/ssh/id_ed25519.$$" &&
      mv "$SHARED/ssh/id_ed25519.$$.pub" "$SHARED/ssh/id_ed25519.pub" &&
      mv "$SHARED/ssh/id_ed25519.$$" "$SHARED/ssh/id_ed25519"
  fi
  install -m 600 "$SHARED/ssh/id_ed25519" /root/.ssh/id_ed25519
  install -m 644 "$SHARED/ssh/id_ed25519.pub" /root/.ssh/authorized_keys
  # Containers come and go with fresh host keys: accept them (a test network, nothing else on it).
  printf 'Host *\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n' \
    >/root/.ssh/config
  ssh-keygen -A >/dev/null
  # Workers started over ssh get a login environment: keep the image's PATH and variables.
  env | grep -E '^(PATH|SLURM_CONF|WANDB_MODE|OMPI_[A-Z_]+|DISTGROW_[A-Z_]+)=' >/root/.ssh/environment
  /usr/sbin/sshd -o PermitUserEnvironment=yes -o PermitRootLogin=prohibit-password
  log "sshd started"
}

case "${1:-}" in
  conf) shift && conf "$@" ;;
  controller) controller ;;
  node) node "$2" ;;
  wait) wait_idle "$2" ;;
  ssh) ssh_setup ;;
  *)
    sed -n '2,16p' "$0" >&2
    exit 2
    ;;
esac
