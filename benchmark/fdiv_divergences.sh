#!/bin/bash
# Do the f-divergences differ? mse, hellinger, pearson_chi2, total_variation (closed forms at --sigma $SIGMA, where
# m / sigma^2 is of order 1; at sigma 1 it stays below ~0.1 and every closed form is nearly the MSE) and variational
# Jensen-Shannon, on 3 classes (seed 0), UA and RA against training steps: each run is trained to 50 steps and
# evaluated, copied and resumed to 100, evaluated, then to 200. Then one table and one figure:
# runs/bench/fdiv_divergences/divergences.{md,png} (the figure needs matplotlib: pip install matplotlib).
#   bash benchmark/fdiv_divergences.sh          (from the repository root; two copies can share the work)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/fdiv_divergences}
SIGMA=${SIGMA:-0.1}
CLASSES=("church" "garbage truck" "parachute")
DIVERGENCES=(mse hellinger pearson_chi2 total_variation js-variational)
STAGES=(50 100 200)

for c in "${CLASSES[@]}"; do base_metrics "$c"; done
for div in "${DIVERGENCES[@]}"; do
  case $div in
    js-variational) flags=(--divergence jensen_shannon --variational --lr 5e-4) ;;  # as benchmark/fdiv.sh
    *) flags=(--divergence "$div" --sigma "$SIGMA") ;;
  esac
  for c in "${CLASSES[@]}"; do
    prev=""
    for steps in "${STAGES[@]}"; do
      run="$OUT/${div}-${steps}__${c// /_}__s0"
      # a later stage starts as a copy of the previous one (no images or metrics), then resumes to its step count
      if [ -z "${DRY_RUN:-}" ] && [ -n "$prev" ] && [ ! -d "$run" ] && [ -f "$prev/summary.json" ] && [ ! -d "$run.lock" ]; then
        mkdir -p "$run" && cp -r "$prev/args.json" "$prev/metrics.jsonl" "$prev/checkpoint" "$prev/unet" "$run/"
        cp "$prev"/cached_sets.* "$run/"
      fi
      [ -z "$prev" ] || [ -f "$prev/summary.json" ] || [ -n "${DRY_RUN:-}" ] || break  # the other copy is on it
      run_and_eval fdiv.py "$OUT" "${div}-${steps}" "$c" 0 --steps "$steps" "${flags[@]}"
      prev=$run
    done
  done
done
[ -n "${DRY_RUN:-}" ] || python benchmark/divergence_figure.py "$OUT" --base "${BASE:-runs/bench/base}"
