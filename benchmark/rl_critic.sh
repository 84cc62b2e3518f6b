#!/bin/bash
# RL unlearning with a timestep-aware critic in the tiny world (issue 7): default flags on 3 classes x 3 seeds, the
# no-critic baseline (--advantage none) on church, eval.py on every run, then the README's table. Restartable:
# finished runs and evaluations are skipped, a stopped run resumes from its checkpoint. The README's main 3-seed table
# under rl_critic.py is this grid with today's defaults, run as single commands with --forget_anchor esd spelled out
# (runs/table/rl_critic_esd); its "empty anchor" table is this script at c729625-e0c0dfd (OUT=runs/table/rl_critic).
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
