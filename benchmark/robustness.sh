#!/bin/bash
# Is the concept really gone? eval.py's soft-prompt attack and relearning on every run of the tiny table's main rows
# (ESD and the official esd_sd.py, f-divergence, PURE, SFD, the RL critic and the paper's RL critic), each run's
# result in RUN/robustness.json (its images in RUN/attack/ and RUN/relearn/{steps}/), the base model's per concept
# in runs/bench/robustness_base/, then the table. Run it after the method scripts (or tiny_table.sh): it takes the
# runs that are trained and evaluated, and skips what is done.
#   bash benchmark/robustness.sh          (from the repository root; two copies share the work, one core each)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ROOT_OUT=${OUT_ROOT:-runs/bench}
ROBUST=(--metrics ua --attack soft_prompt --relearn 5 10 20 50)
CLASSES=("church" "garbage truck" "parachute")
VARIANTS="esd esd_official fdiv-hellinger pure sfd rl_critic rl_critic-paper"

base() {  # the base model per class, one after the other (its attack/ and relearn/ images share runs/base__tiny/)
  for c in "${CLASSES[@]}"; do
    out=$ROOT_OUT/robustness_base/${c// /_}.json
    [ -f "$out" ] || python eval.py tiny --forget_class "$c" "${ROBUST[@]}" --output "$out"
  done
  touch "$ROOT_OUT/robustness_base/done"
}
run_once robustness-base "$ROOT_OUT/robustness_base/done" base
folders=()
for method in esd fdiv pure sfd rl_critic; do
  folders+=("$ROOT_OUT/$method")
  for run in "$ROOT_OUT/$method"/*__s[0-9]*; do
    [ -f "$run/metrics.json" ] || continue  # not trained and evaluated (yet)
    name=$(basename "$run")
    case " $VARIANTS " in *" ${name%%__*} "*) ;; *) continue ;; esac
    run_once robustness "$run/robustness.json" python eval.py "$run" "${ROBUST[@]}" --output "$run/robustness.json"
  done
done
[ -n "${DRY_RUN:-}" ] && exit 0
python benchmark/collect.py "${folders[@]}" --robustness --base "$ROOT_OUT/robustness_base" > "$ROOT_OUT/robustness.md.tmp"
mv "$ROOT_OUT/robustness.md.tmp" "$ROOT_OUT/robustness.md"
cat "$ROOT_OUT/robustness.md"
