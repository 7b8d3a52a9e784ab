#!/usr/bin/env bash
# The main job on its embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist), an MLP,
# SGD with momentum and a ×5 multistep decay, compared on the CPU by `distgrow compare`: the
# plain LR decay (the baseline), the batch growing instead, and the hybrid (the batch capped,
# the LR taking the rest). It writes a report (report.md, PNG plots, summary.json) and prints
# its table and where it is.
# Extra arguments are config overrides for every run, e.g.: bash scripts/demo.sh run.epochs=3
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DISTGROW_VENV:-.venv}/bin
CONFIG=configs/fashion_mnist_mlp.yaml
OUT=reports/demo-$(date +%Y%m%d-%H%M%S)

echo "== the plan: growing the batch instead of decaying the LR =="
"$BIN/distgrow" plan "$CONFIG" "$@"
echo
echo "== distgrow compare: decay_lr, grow_batch and the hybrid, same data and seed =="
"$BIN/distgrow" compare "$CONFIG" "$@" --out "$OUT"
echo
echo "== the report ($OUT/report.md) =="
# The table: from the first row of the table to the line after it.
sed -n '/^| run /,/^$/p' "$OUT/report.md"
echo "report: $OUT/report.md  plots: $OUT/*.png  numbers: $OUT/summary.json"
