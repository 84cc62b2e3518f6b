#!/bin/bash
# f-divergence unlearning in the tiny world: the default (hellinger) on 3 classes x 3 seeds; then on church, seed 0,
# the other closed forms (mse, pearson_chi2) and one variational Jensen-Shannon run. eval.py on every run, then the
# table. ESD (fdiv.py --anchor esd --divergence mse) is in benchmark/esd_official.sh, beside the official script.
# Restartable: finished runs and evaluations are skipped, a stopped run resumes from its checkpoint.
#   bash benchmark/fdiv.sh          (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/fdiv}
CLASSES=("church" "garbage truck" "parachute")
SEEDS=(0 1 2)

for c in "${CLASSES[@]}"; do base_metrics "$c"; done
for seed in "${SEEDS[@]}"; do
  for c in "${CLASSES[@]}"; do run_and_eval fdiv.py "$OUT" fdiv-hellinger "$c" "$seed"; done
done
run_and_eval fdiv.py "$OUT" fdiv-mse church 0 --divergence mse
run_and_eval fdiv.py "$OUT" fdiv-pearson_chi2 church 0 --divergence pearson_chi2
run_and_eval fdiv.py "$OUT" fdiv-js-variational church 0 --divergence jensen_shannon --variational --lr 5e-4
table "$OUT" --base "${BASE:-runs/bench/base}"
