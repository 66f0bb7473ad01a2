#!/usr/bin/env bash
# DiffMAE's decoders compared on the demo (docs/diffmae.md, "The decoders compared"): each variant
# pretrains the diffmae-demo preset with one decoder wiring per seed, prints its probe / kNN
# against the random-init floor and the raw pixels and writes results.json; bench/seed_table.py
# then assembles one line per variant (mean ± std over the seeds).
#
#   bench/diffmae_decoders.sh                      # 5 variants x seeds 0 1 2 at the preset's 60 epochs
#   SEEDS=0 EPOCHS=8 bench/diffmae_decoders.sh     # one short seed (what docs/diffmae.md reports)
#
# Every variant has 3 decoder blocks, as many as the encoder, so 'deepest_first' is the U-Net-like
# pairing (decoder block i reads encoder block 2 - i) and no variant has more decoder than another.
# CPU cost at the preset's length: about 5 min per run on 2 idle cores, 15 runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-runs/diffmae-decoders}
DEPTH=${DEPTH:-3}
EXTRA=()
[[ -n "${EPOCHS:-}" ]] && EXTRA+=("--engine.epochs=$EPOCHS")
# name:decoder_kind:decoder_topdown
VARIANTS=${VARIANTS:-"joint:joint:last cross:cross:last cross-td:cross:deepest_first cs:cross_self:last cs-td:cross_self:deepest_first"}
for v in $VARIANTS; do
  IFS=: read -r name kind topdown <<<"$v"
  for s in $SEEDS; do
    dir="$OUT/$name-s$s"
    if [[ -f "$dir/results.json" ]]; then echo "skip $dir (results.json exists)"; continue; fi
    echo "== $name seed $s -> $dir"
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} $PY train.py --preset diffmae-demo \
      --diffmae.decoder_kind="$kind" --diffmae.decoder_topdown="$topdown" --model.decoder_depth="$DEPTH" \
      --engine.seed="$s" --engine.out_dir="$dir" --engine.progress=false --engine.overwrite=true \
      ${EXTRA[@]+"${EXTRA[@]}"}
  done
done
$PY bench/seed_table.py --summary --title "DiffMAE demo: decoders (${DEPTH} blocks), seeds ${SEEDS}" \
  "$OUT"/*/results.json --out "$OUT/decoders.md"
