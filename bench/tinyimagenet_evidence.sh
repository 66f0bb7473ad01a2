#!/usr/bin/env bash
# The Tiny ImageNet CPU evidence of docs/results.md, rerun on the current code (issue 25 item 4):
#  1. three pretraining seeds of the 780 s configuration at a fixed step count (316 steps of 128,
#     what the 2026-12-01 run's calibration planned), each beside three random-init floors and the
#     raw-pixel floor, assembled by bench/learn_seeds.py;
#  2. one long run (60 minutes of pretraining by default) that keeps a checkpoint every CURVE_EVERY
#     steps and evaluates each, drawn by bench/plot_curve.py as docs/data/tinyimagenet_curve.png.
# CPU-heavy: ~12 min wall per seed and 60+ min for the curve on 2 idle cores. Run it in the
# background on a machine you do not share:
#   nohup bench/tinyimagenet_evidence.sh > runs/ti-evidence.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data/tinyimagenet-wds}
OUT=${OUT:-runs/ti-evidence}
SEEDS=${SEEDS:-"0 1 2"}
STEPS=${STEPS:-316}
LONG_S=${LONG_S:-3600}
CURVE_EVERY=${CURVE_EVERY:-250}
# LONG_STEPS fixes the long run's step count instead of calibrating it to LONG_S: on a shared
# machine the calibration would measure the neighbours, not the run.
LONG_STEPS=${LONG_STEPS:-0}
mkdir -p "$OUT"
COMMON=(--data-dir "$DATA" --train-shards 10 --val-shards 2 --device cpu --threads 1 --model tiny
        --img-size 32 --patch-size 4 --latent-dim 16 --batch-size 128 --blr 3e-3 --classes 0
        --eval-classes 20 --probe-epochs 90 --pixel-floor)
for s in $SEEDS; do
  [[ -f "$OUT/seed$s.json" ]] && { echo "skip seed $s"; continue; }
  OMP_NUM_THREADS=1 $PY bench/learn_check.py "${COMMON[@]}" --budget-s 100000 --steps "$STEPS" --seed "$s" \
    --run-dir "$OUT/run-seed$s" --out "$OUT/seed$s.json"
done
$PY bench/learn_seeds.py "$OUT"/seed*.json --out "$OUT/seeds.md"
if [[ ! -f "$OUT/long.json" ]]; then
  # The step count is calibrated to LONG_S seconds; a checkpoint every CURVE_EVERY steps is one point.
  OMP_NUM_THREADS=1 $PY bench/learn_check.py "${COMMON[@]}" --budget-s "$LONG_S" --steps "$LONG_STEPS" --curve-every "$CURVE_EVERY" \
    --seed 0 --run-dir "$OUT/run-long" --out "$OUT/long.json"
fi
$PY bench/plot_curve.py "$OUT/long.json" --out docs/data/tinyimagenet_curve.png | tee "$OUT/curve.txt"
cp "$OUT"/seed*.json "$OUT/long.json" docs/data/ 2>/dev/null || true
echo "tables: $OUT/seeds.md, curve: docs/data/tinyimagenet_curve.png ($OUT/curve.txt)"
