#!/bin/bash
# f-divergence unlearning in the tiny world, most important runs first: the default (hellinger) on 3
# classes x 3 seeds; then on church, seed 0: mse, pearson_chi2, ESD (--anchor esd --divergence mse) and one
# variational Jensen-Shannon run; then the rest of the mse / pearson_chi2 / ESD grid (3 classes x 3 seeds for the
# divergences, church x 3 seeds for ESD, then ESD on garbage truck and parachute x 3 seeds); then garbage truck with
# other anchors. eval.py on every run, then the table. Restartable: finished runs and evaluations are
# skipped, a stopped run resumes from its checkpoint.
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
run_and_eval fdiv.py "$OUT" esd church 0 --anchor esd --divergence mse
run_and_eval fdiv.py "$OUT" fdiv-js-variational church 0 --divergence jensen_shannon --variational --lr 5e-4
for seed in "${SEEDS[@]}"; do
  for c in "${CLASSES[@]}"; do
    run_and_eval fdiv.py "$OUT" fdiv-mse "$c" "$seed" --divergence mse
    run_and_eval fdiv.py "$OUT" fdiv-pearson_chi2 "$c" "$seed" --divergence pearson_chi2
  done
  run_and_eval fdiv.py "$OUT" esd church "$seed" --anchor esd --divergence mse
done
# ESD on the other two classes (the ESD baseline of the whole tiny-world table)
for seed in "${SEEDS[@]}"; do
  for c in "garbage truck" "parachute"; do run_and_eval fdiv.py "$OUT" esd "$c" "$seed" --anchor esd --divergence mse; done
done
# garbage truck with other anchors than its default (cassette player): gas pump (the first default), church, and
# church with 300 steps
for seed in "${SEEDS[@]}"; do
  run_and_eval fdiv.py "$OUT" fdiv-hellinger-anchor_gas_pump "garbage truck" "$seed" --anchor "gas pump"
  run_and_eval fdiv.py "$OUT" fdiv-hellinger-anchor_church "garbage truck" "$seed" --anchor church
done
run_and_eval fdiv.py "$OUT" fdiv-hellinger-anchor_church-300steps "garbage truck" 0 --anchor church --steps 300
table "$OUT" --base "${BASE:-runs/bench/base}"
