#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py; also `make gpu-check`): on a machine with a GPU, the
# `gpu` test tier, host-device syncs per update, a real out-of-memory fallback, 2-rank DDP on
# CUDA, DeepSpeed ZeRO-2 fp16/bf16 and the Fashion-MNIST compare's wall-clock, in under ten
# minutes; it prints one table (paste it into docs/speed.md).
# Extra arguments go to the script, e.g.: bash scripts/gpu_check.sh --only sync,oom
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DISTGROW_VENV:-.venv}/bin
exec "$BIN/python" scripts/gpu_check.py "$@"
