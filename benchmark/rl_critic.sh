#!/bin/bash
# RL unlearning with a timestep-aware critic in the tiny world: default flags on 3 classes x 3 seeds, the
# no-critic baseline (--advantage none) on church, eval.py on every run, then the table. Restartable:
# finished runs and evaluations are skipped, a stopped run resumes from its checkpoint.
#   bash benchmark/rl_critic.sh          (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/rl_critic}
CLASSES=("church" "garbage truck" "parachute")
SEEDS=(0 1 2)

for c in "${CLASSES[@]}"; do base_metrics "$c"; done
for seed in "${SEEDS[@]}"; do
  for c in "${CLASSES[@]}"; do run_and_eval rl_critic.py "$OUT" rl_critic "$c" "$seed"; done
  run_and_eval rl_critic.py "$OUT" rl_critic-nocritic church "$seed" --advantage none
done
table "$OUT" --base "${BASE:-runs/bench/base}"
