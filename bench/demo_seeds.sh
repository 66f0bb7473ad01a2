#!/usr/bin/env bash
# The demos' seed tables (README, docs/results.md, docs/diffmae.md) from their own results.json:
# PRESETS (default: demo and diffmae-demo) x SEEDS (default 0 1 2), then bench/seed_table.py.
#   bench/demo_seeds.sh                       # ~4-8 min per run on 2 idle cores, 6 runs
#   PRESETS=demo SEEDS="0 1 2" bench/demo_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESETS=${PRESETS:-"demo diffmae-demo"}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-runs/demo-seeds}
for p in $PRESETS; do
  for s in $SEEDS; do
    dir="$OUT/$p-s$s"
    [[ -f "$dir/results.json" ]] && { echo "skip $dir"; continue; }
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PY train.py --preset "$p" --engine.seed="$s" \
      --engine.out_dir="$dir" --engine.progress=false --engine.overwrite=true
  done
  $PY bench/seed_table.py --title "$p, seeds $SEEDS" "$OUT/$p"-s*/results.json --out "$OUT/$p.md"
done
