#!/usr/bin/env bash
# A Docker engine and a base image, where no registry can be reached (tests/test_docker_image.py,
# CI, an air-gapped build host). INFRA.md: no engine runs by default on these machines, but
# Debian's docker.io can be started by hand with its own data root and socket, and a bookworm
# base image made with debootstrap replaces a pull.
#
#   bash scripts/docker_engine.sh start   # an engine that answers; prints DOCKER_HOST=... (and
#                                         # DISTGROW_DOCKER_STARTED=1 when this script started it)
#   bash scripts/docker_engine.sh base    # the base image distgrow-base:bookworm (debootstrap +
#                                         # docker import, ~1 min), unless it is already there
#   bash scripts/docker_engine.sh stop    # stop the engine this script started
#
# Exit status 3: no engine answers and none can be installed here (needs root and apt-get).
# Environment: DISTGROW_DOCKER_DIR (data root, socket and logs; default /var/tmp/distgrow-docker),
# DISTGROW_DOCKER_BASE (the base image's tag), DISTGROW_DEBIAN_MIRROR (the archive debootstrap
# uses; default: the first Debian archive in this machine's own apt sources).
set -euo pipefail
DIR=${DISTGROW_DOCKER_DIR:-/var/tmp/distgrow-docker}
SOCK="unix://$DIR/docker.sock"
BASE_IMAGE=${DISTGROW_DOCKER_BASE:-distgrow-base:bookworm}
MIRROR=${DISTGROW_DEBIAN_MIRROR:-}
UNAVAILABLE=3

log() { printf '[docker_engine] %s\n' "$*" >&2; }
answers() { command -v docker >/dev/null && DOCKER_HOST=$1 timeout 20 docker info >/dev/null 2>&1; }

need_root_apt() {
  if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
    log "$1 is missing and cannot be installed here (needs root and apt-get):"
    log "install Debian's docker.io and debootstrap, or point DOCKER_HOST at a running engine"
    exit "$UNAVAILABLE"
  fi
}

apt_install() {
  log "apt-get install $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "$@" >/dev/null
}

start() {
  # An engine that already answers: the user's, the system's, or the one started here before.
  local candidate
  for candidate in "${DOCKER_HOST:-}" unix:///var/run/docker.sock "$SOCK"; do
    if [[ -n "$candidate" ]] && answers "$candidate"; then
      echo "DOCKER_HOST=$candidate"
      return
    fi
  done
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    need_root_apt "a Docker engine (dockerd)"
    apt_install docker.io
  fi
  [[ $(id -u) -eq 0 ]] || { log "dockerd needs root here (no rootless setup)"; exit "$UNAVAILABLE"; }
  mkdir -p "$DIR"
  # Its own data root, exec root and socket: nothing of the host's Docker set-up is touched.
  setsid dockerd --data-root "$DIR/root" --exec-root "$DIR/exec" --pidfile "$DIR/dockerd.pid" \
    -H "$SOCK" </dev/null >"$DIR/dockerd.log" 2>&1 &
  local waited
  for waited in $(seq 1 60); do
    if answers "$SOCK"; then
      log "dockerd up in ${waited} s (log: $DIR/dockerd.log)"
      echo "DOCKER_HOST=$SOCK"
      echo "DISTGROW_DOCKER_STARTED=1"
      return
    fi
    sleep 1
  done
  tail -n 30 "$DIR/dockerd.log" >&2 || true
  log "dockerd did not answer within 60 s (log: $DIR/dockerd.log)"
  exit 1
}

# The first archive this machine's apt fetches from (deb822 .sources or one-line .list files),
# leaving out the security archive, which debootstrap cannot bootstrap from.
apt_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    if [[ "$f" == *.sources ]]; then
      awk '/^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i }' "$f"
    else
      awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' "$f"
    fi
  done | grep -v -e '-security' | head -n1
}

base() {
  export DOCKER_HOST=${DOCKER_HOST:-$SOCK}
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE is already there"
    return
  fi
  command -v debootstrap >/dev/null || { need_root_apt debootstrap; apt_install debootstrap; }
  [[ -n "$MIRROR" ]] || MIRROR=$(apt_mirror)
  if [[ -z "$MIRROR" ]]; then
    log "no Debian archive in this machine's apt sources: set DISTGROW_DEBIAN_MIRROR=<archive URL>"
    exit 1
  fi
  mkdir -p "$DIR"
  local root t0=$SECONDS
  root=$(mktemp -d "$DIR/rootfs.XXXXXX")
  # minbase + what bootstrap.sh cannot apt-get for itself: Python with venv, and CA certificates.
  log "debootstrap bookworm from $MIRROR (log: $DIR/debootstrap.log)"
  if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$MIRROR" >"$DIR/debootstrap.log" 2>&1; then
    tail -n 20 "$DIR/debootstrap.log" >&2
    rm -rf "$root"
    log "debootstrap failed (log: $DIR/debootstrap.log); is $MIRROR reachable?"
    exit 1
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
  log "$BASE_IMAGE imported in $((SECONDS - t0)) s"
}

stop() {
  [[ -f "$DIR/dockerd.pid" ]] || { log "no dockerd started here"; return; }
  local pid
  pid=$(cat "$DIR/dockerd.pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 30); do
    kill -0 "$pid" 2>/dev/null || { log "dockerd stopped"; return; }
    sleep 1
  done
  kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  base) base ;;
  stop) stop ;;
  *)
    echo "usage: bash scripts/docker_engine.sh start|base|stop" >&2
    exit 2
    ;;
esac
