#!/usr/bin/env bash
# The main job end to end (`make demo`): train the 48-bit Fashion-MNIST config into RUN_DIR
# (resuming when RUN_DIR holds a checkpoint), evaluate, build the index, search three test images,
# write the report and say where it is. With DEMO_2D=1 (`make demo-2d`) it runs the seed's demo
# instead: a 2-D EmbeddingNet trained with the online triplet loss and semi-hard negatives, its kNN
# accuracy on the test set, and the train and test 2-D embedding scatter plots.
# Usage: scripts/demo.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/demo-48}"
CONFIG="${DEMO_CONFIG:-fashion-mnist-48}"  # a shipped config name (deephash configs) or a TOML file
DH=.venv/bin/deephash
[ -x "$DH" ] || { echo "demo: $DH not found; run 'make venv' first" >&2; exit 1; }
start=$(date +%s)

run_stage() {  # run_stage CONFIG RUN_DIR [--set ...]: train (or resume, or skip when finished)
  local config=$1 run=$2; shift 2
  if [ -f "$run/model.pt" ]; then
    echo "== $run already trained; skipping training"
  elif [ -f "$run/checkpoints/last.pt" ]; then
    echo "== resuming $run from its last checkpoint"
    "$DH" train "$config" --out "$run" --resume "$@"
  else
    echo "== training $config into $run"
    "$DH" train "$config" --out "$run" "$@"
  fi
}


if [ -n "${DEMO_2D:-}" ]; then
  RUN2D="${RUN}-2d"
  run_stage fashion-mnist-2d-triplet "$RUN2D" --set train.epochs=2
  echo "== 2-D embedding: kNN accuracy on the test set (database: training set)"
  "$DH" evaluate "$RUN2D"
  "$DH" report "$RUN2D" >/dev/null
  echo "2-D embedding plots: $(cd "$RUN2D" && pwd)/report/embeddings_{train,test}.png"
  exit 0
fi

run_stage "$CONFIG" "$RUN"

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
