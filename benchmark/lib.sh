# Shared by the benchmark scripts: one function that trains (or resumes) a run and evaluates it, each step skipped
# when its output already exists, so a script that was stopped can simply be started again.
#   run_and_eval SCRIPT OUT_FOLDER VARIANT CONCEPT SEED [FLAGS...]
# The run folder is OUT_FOLDER/{VARIANT}__{concept with _ for spaces}__s{SEED} (benchmark/collect.py reads the name).
# Two copies of a benchmark script can run at once (one per core, OMP_NUM_THREADS=1): each run is taken by the
# first copy that creates its lock folder ({run}.lock) and skipped by the other. A copy that is killed leaves its
# lock behind: remove the .lock folders before restarting.

run_and_eval() {
  local script=$1 out=$2 variant=$3 concept=$4 seed=$5
  shift 5
  local run="$out/${variant}__${concept// /_}__s${seed}"
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

base_metrics() {  # base-model numbers per forget class: runs/bench/base/{concept}.json
  local concept=$1 base=${BASE:-runs/bench/base}
  [ -f "$base/${concept// /_}.json" ] || python eval.py tiny --forget_class "$concept" --output "$base/${concept// /_}.json"
}
