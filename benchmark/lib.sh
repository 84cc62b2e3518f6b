# Shared by the benchmark scripts: one function that trains (or resumes) a run and evaluates it, each step skipped
# when its output already exists, so a script that was stopped can simply be started again.
#   run_and_eval SCRIPT OUT_FOLDER VARIANT CONCEPT SEED [FLAGS...]
# The run folder is OUT_FOLDER/{VARIANT}__{concept with _ for spaces}__s{SEED} (benchmark/collect.py reads the name).
# Two copies of a benchmark script can run at once (one per core, OMP_NUM_THREADS=1): each run is taken by the
# first copy that creates its lock folder ({run}.lock) and skipped by the other. A copy that is killed leaves its
# lock behind: remove the .lock folders before restarting (benchmark/tiny_table.sh lists them).
# DRY_RUN=1 prints what would run, one line per job, done or not, and runs nothing: "run SCRIPT VARIANT CONCEPT SEED
# FOLDER" (train + eval.py) or "once KIND OUTPUT" (tests/test_benchmark.py reads these lines).

run_and_eval() {
  local script=$1 out=$2 variant=$3 concept=$4 seed=$5
  shift 5
  local run="$out/${variant}__${concept// /_}__s${seed}"
  if [ -n "${DRY_RUN:-}" ]; then echo "run $script $variant ${concept// /_} $seed $run"; return 0; fi
  if [ -f "$run/metrics.json" ]; then return 0; fi
  mkdir -p "$out"
  mkdir "$run.lock" 2>/dev/null || return 0  # the other copy is on it
  if [ ! -f "$run/summary.json" ]; then
    local resume=()
    [ -d "$run/checkpoint" ] && resume=(--resume)
    /usr/bin/time -f "%e s wall, %M KB max RSS" python "$script" --concept "$concept" --seed "$seed" --out_dir "$run" \
      "${resume[@]}" "$@"
  fi
  [ -f "$run/metrics.json" ] || python eval.py "$run"
  rmdir "$run.lock"
}

run_once() {  # run_once KIND OUTPUT_FILE COMMAND...: COMMAND unless OUTPUT_FILE exists or the other copy is on it
  local kind=$1 output=$2
  shift 2
  if [ -n "${DRY_RUN:-}" ]; then echo "once $kind $output"; return 0; fi
  if [ -f "$output" ]; then return 0; fi
  mkdir -p "$(dirname "$output")"
  mkdir "$output.lock" 2>/dev/null || return 0
  "$@"
  rmdir "$output.lock"
}

base_metrics() {  # base-model numbers per forget class: runs/bench/base/{concept}.json
  local concept=$1 base=${BASE:-runs/bench/base}
  run_once base-eval "$base/${concept// /_}.json" python eval.py tiny --forget_class "$concept" --output "$base/${concept// /_}.json"
}

table() {  # table FOLDER... [collect.py flags...]: the results table (nothing under DRY_RUN)
  if [ -z "${DRY_RUN:-}" ]; then python benchmark/collect.py "$@"; fi
}
