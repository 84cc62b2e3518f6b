#!/bin/bash
# The whole tiny-world table in one command: every method x 3 classes (church, garbage truck, parachute) x 3 seeds,
# eval.py on every run, then one table with mean +- std, training wall time, step / UNet passes and peak memory
# (benchmark/collect.py), and one row per run with its own times (--per_run). The methods: ESD (fdiv.py --anchor esd
# --divergence mse) beside the official esd_sd.py, f-divergence (hellinger), PURE, SFD, RL critic; each method
# script's extra rows (ablations, the paper's RL critic, the divergence study) come along (docs/results.md), then the
# soft-prompt attack and relearning on the main rows (benchmark/robustness.sh, runs/bench/robustness.md). The
# base-model rows are eval.py on the base model (SFD: on its distilled generator).
#
#   bash benchmark/tiny_table.sh PATH/TO/erasing                  (from the repository root; one lane; the path is a
#                                                                  clone of rohitgandikota/erasing, esd_official.sh)
#   bash benchmark/tiny_table.sh P & bash benchmark/tiny_table.sh P  (two lanes, one core each; see lib.sh's locks)
#   DRY_RUN=1 bash benchmark/tiny_table.sh                        (list the jobs, run nothing)
#
# Restartable: finished runs and evaluations are skipped, a stopped run resumes from its checkpoint. A lane that was
# killed leaves {run}.lock folders behind; this script lists them at the end (remove them before restarting).
# Each run uses one thread (OMP_NUM_THREADS=1 unless set). Outputs under runs/bench/ (OUT_ROOT to change), the
# tables in runs/bench/tiny_table.md and runs/bench/tiny_table_per_run.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ROOT_OUT=${OUT_ROOT:-runs/bench}
export BASE=$ROOT_OUT/base

OUT=$ROOT_OUT/esd bash benchmark/esd_official.sh "${1:-}"
OUT=$ROOT_OUT/fdiv bash benchmark/fdiv.sh
OUT=$ROOT_OUT/fdiv_divergences bash benchmark/fdiv_divergences.sh
OUT=$ROOT_OUT/pure ABLATION_SEEDS=${ABLATION_SEEDS:-"0 1 2"} bash benchmark/pure.sh
OUT=$ROOT_OUT/sfd SFD_BASE=$ROOT_OUT/sfd_base bash benchmark/sfd.sh
OUT=$ROOT_OUT/rl_critic bash benchmark/rl_critic.sh
OUT_ROOT=$ROOT_OUT bash benchmark/robustness.sh  # the attack and relearning table: robustness.md
[ -n "${DRY_RUN:-}" ] && exit 0

folders=("$ROOT_OUT/esd" "$ROOT_OUT/fdiv" "$ROOT_OUT/pure" "$ROOT_OUT/sfd" "$ROOT_OUT/rl_critic")
bases=("$BASE" "$BASE" "$BASE" "$ROOT_OUT/sfd_base" "$BASE")
python benchmark/collect.py "${folders[@]}" --base "${bases[@]}" > "$ROOT_OUT/tiny_table.md.tmp"
mv "$ROOT_OUT/tiny_table.md.tmp" "$ROOT_OUT/tiny_table.md"
python benchmark/collect.py "${folders[@]}" --per_run > "$ROOT_OUT/tiny_table_per_run.md.tmp"
mv "$ROOT_OUT/tiny_table_per_run.md.tmp" "$ROOT_OUT/tiny_table_per_run.md"
cat "$ROOT_OUT/tiny_table.md"
echo
echo "per run: $ROOT_OUT/tiny_table_per_run.md"
locks=$(find "$ROOT_OUT" -maxdepth 2 -name '*.lock' -type d)
if [ -n "$locks" ]; then
  echo "the other lane is still on these (or was killed: then remove them and start again); the table above lacks them:"
  echo "$locks"
fi
