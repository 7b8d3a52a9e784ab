#!/usr/bin/env bash
# The main job on its embedded default: Fashion-MNIST (Debian's dataset-fashion-mnist), an MLP,
# SGD with momentum and a ×5 multistep decay, trained twice on the CPU — once with the plain LR
# decay (the baseline), once growing the batch instead — then the two runs side by side.
# Extra arguments are config overrides for both runs, e.g.: bash scripts/demo.sh run.epochs=3
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DISTGROW_VENV:-.venv}/bin
CONFIG=configs/fashion_mnist_mlp.yaml
OUT=runs/demo/$(date +%Y%m%d-%H%M%S)

echo "== the plan: growing the batch instead of decaying the LR =="
"$BIN/distgrow" plan "$CONFIG" "$@"
echo
for mode in decay_lr grow_batch; do
  echo "== training: growth.mode=$mode =="
  "$BIN/distgrow" train "$CONFIG" "growth.mode=$mode" "run.output_dir=$OUT/$mode" "$@"
  echo
done
"$BIN/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {m: json.loads((out / m / "summary.json").read_text()) for m in ("decay_lr", "grow_batch")}
base, grow = rows["decay_lr"], rows["grow_batch"]
print("== side by side (measured in this run) ==")
print(f"{'':22}{'decay_lr':>12}{'grow_batch':>12}{'ratio':>9}")
for key, label in (("total_updates", "parameter updates"), ("wall_s", "wall-clock (s)")):
    b, g = base[key], grow[key]
    print(f"{label:22}{b:>12,.1f}{g:>12,.1f}{b / g:>8.2f}×")
for key in ("val_acc", "val_loss"):
    if key in base:
        print(f"{key:22}{base[key]:>12.4f}{grow[key]:>12.4f}")
print(f"run directories: {out}/decay_lr and {out}/grow_batch (metrics.jsonl, summary.json)")
PY
