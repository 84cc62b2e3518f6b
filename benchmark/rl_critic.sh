#!/bin/bash
# The RL critic in the tiny world, most important runs first, 3 classes x 3 seeds each: the default (both trust
# regions: the forget side toward ESD's target is this repository's extension); the paper's method
# (--forget_kl_weight 0); then the paper's two ablations of it: no critic (--advantage none, DDPO's per-prompt
# normalisation) and the critic on the reference's x0_hat instead of the noisy state (--critic_input clean).
# eval.py on every run, then the table. Restartable: finished runs are skipped, a stopped run resumes.
#   bash benchmark/rl_critic.sh          (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/rl_critic}
CLASSES=("church" "garbage truck" "parachute")
SEEDS=(0 1 2)

for c in "${CLASSES[@]}"; do base_metrics "$c"; done
for variant in rl_critic rl_critic-paper rl_critic-paper-nocritic rl_critic-paper-clean; do
  case $variant in
    rl_critic) flags=() ;;
    rl_critic-paper) flags=(--forget_kl_weight 0) ;;
    rl_critic-paper-nocritic) flags=(--forget_kl_weight 0 --advantage none) ;;
    rl_critic-paper-clean) flags=(--forget_kl_weight 0 --critic_input clean) ;;
  esac
  for seed in "${SEEDS[@]}"; do
    for c in "${CLASSES[@]}"; do run_and_eval rl_critic.py "$OUT" "$variant" "$c" "$seed" "${flags[@]}"; done
  done
done
table "$OUT" --base "${BASE:-runs/bench/base}"
