#!/bin/bash
# Score Forgetting Distillation in the tiny world: the distilled base generator (data/tiny-sd-generator)
# written out as a run folder and evaluated per forget class (the base rows the bars compare with), then the default
# flags on 3 classes x 3 seeds, eval.py on every run (it samples the one-step generator: args.json's sampler.t_init),
# then the table. Restartable: finished runs and evaluations are skipped.
#   bash benchmark/sfd.sh          (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
OUT=${OUT:-runs/bench/sfd}
BASE=${SFD_BASE:-runs/bench/sfd_base}
CLASSES=("church" "garbage truck" "parachute")
SEEDS=(0 1 2)

GEN=$BASE/generator
run_once sfd-base-generator "$GEN/summary.json" \
  python sfd.py --concept none --steps 0 --init_generator data/tiny-sd-generator --out_dir "$GEN"
while [ -z "${DRY_RUN:-}" ] && [ ! -f "$GEN/summary.json" ]; do  # the other copy is writing it (about a minute)
  [ -d "$GEN/summary.json.lock" ] || { echo "sfd.sh: $GEN was not written" >&2; exit 1; }
  sleep 10
done
for c in "${CLASSES[@]}"; do
  run_once sfd-base-eval "$BASE/${c// /_}.json" python eval.py "$GEN" --forget_class "$c" --output "$BASE/${c// /_}.json"
done
for seed in "${SEEDS[@]}"; do
  for c in "${CLASSES[@]}"; do run_and_eval sfd.py "$OUT" sfd "$c" "$seed"; done
done
table "$OUT" --base "$BASE"
