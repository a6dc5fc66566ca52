#!/usr/bin/env bash
# The main job end to end (`make demo`): train the 48-bit Fashion-MNIST config into RUN_DIR
# (resuming when RUN_DIR holds a checkpoint), evaluate, build the index, search three test images,
# write the report and say where it is. Usage: scripts/demo.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/demo-48}"
CONFIG="${DEMO_CONFIG:-configs/fashion-mnist-48.toml}"
DH=.venv/bin/deephash
[ -x "$DH" ] || { echo "demo: $DH not found; run 'make venv' first" >&2; exit 1; }
start=$(date +%s)

if [ -f "$RUN/model.pt" ]; then
  echo "== $RUN already trained; skipping training"
elif [ -f "$RUN/checkpoints/last.pt" ]; then
  echo "== resuming $RUN from its last checkpoint"
  "$DH" train "$CONFIG" --out "$RUN" --resume
else
  echo "== training $CONFIG into $RUN"
  "$DH" train "$CONFIG" --out "$RUN"
fi

echo "== evaluating: test images as queries, training images as the database"
"$DH" evaluate "$RUN"

echo "== building the Hamming index of the training images"
"$DH" index build "$RUN" --split train --out "$RUN/index"
"$DH" index info "$RUN/index"

echo "== searching three test images"
"$DH" search "$RUN/index" --run "$RUN" test:0 test:1 test:2 -k 5

echo "== writing the report"
"$DH" report "$RUN"
echo "demo finished in $(( $(date +%s) - start )) s; open $(cd "$RUN" && pwd)/report.html"
