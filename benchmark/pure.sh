#!/bin/bash
# PURE in the tiny world: default flags on 3 classes x 3 seeds, the three ablations on church (seed 0 by
# default; ABLATION_SEEDS="0 1 2" for all three, as tiny_table.sh does), eval.py on every run, then the tables. Restartable:
# finished runs and evaluations are skipped, a stopped run resumes from its checkpoint.
#   bash benchmark/pure.sh          (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/pure}
CLASSES=("church" "garbage truck" "parachute")
SEEDS=(0 1 2)
read -r -a ABLATION_SEEDS <<< "${ABLATION_SEEDS:-0}"

for c in "${CLASSES[@]}"; do base_metrics "$c"; done
for seed in "${SEEDS[@]}"; do
  for c in "${CLASSES[@]}"; do run_and_eval pure.py "$OUT" pure "$c" "$seed"; done
done
for seed in "${ABLATION_SEEDS[@]}"; do
  run_and_eval pure.py "$OUT" pure-ga church "$seed" --forget_loss ga
  run_and_eval pure.py "$OUT" pure-norepair church "$seed" --repair_steps_per_cycle 0
  run_and_eval pure.py "$OUT" pure-nokl church "$seed" --kl_weight 0
done
table "$OUT" --base "${BASE:-runs/bench/base}"
