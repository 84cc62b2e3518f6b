#!/bin/bash
# The official ESD script (rohitgandikota/erasing, esd_sd.py) beside this repository's ESD (fdiv.py --anchor esd
# --divergence mse) on the tiny world: the same lr (1e-3), iterations (200), parameters (cross-attention to_k/to_v:
# esd-x-strict), negative guidance (2), partial sampling (50 steps at guidance 3, batch 1) and prompt ("an image of a
# church"; also the bare class name, "church", as a new user of esd_sd.py might type); 3 classes x 3 seeds, eval.py
# on every run, then one table with the rows and their training times.
#   bash benchmark/esd_official.sh PATH/TO/erasing      (a clone of github.com/rohitgandikota/erasing; nothing is
#                                                        fetched at run time)
# The official file is copied to a temporary folder and patched only where it is hard-coded for SD on a GPU: the
# model id (-> data/tiny-sd), 1024 px (-> the tiny world's 32 px), bf16 (-> fp32, the dtype of ours on a CPU), and
# Python's and torch's seeds set from SEED (it draws its own, unseeded). Its saved parameters are loaded into the
# base UNet and written as a run folder (method esd_official) that eval.py and collect.py read as any other.
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmark/lib.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OFFICIAL=${1:-}
if [ -z "${DRY_RUN:-}" ] && [ ! -f "$OFFICIAL/esd_sd.py" ]; then
  echo "usage: bash benchmark/esd_official.sh PATH/TO/erasing (a clone of github.com/rohitgandikota/erasing; got '$OFFICIAL', which has no esd_sd.py)" >&2
  exit 2
fi
OUT=${OUT:-runs/bench/esd}
CLASSES=("church" "garbage truck" "parachute")
SEEDS=(0 1 2)
ROOT=$(pwd)

official_run() {  # official_run VARIANT CONCEPT SEED PROMPT ("": our forget prompt): esd_sd.py, then a run folder
  local variant=$1 concept=$2 seed=$3 prompt=$4 run="$OUT/$1__${2// /_}__s$3"
  if [ -n "${DRY_RUN:-}" ]; then echo "run esd_official $variant ${concept// /_} $seed $run"; return 0; fi
  [ -f "$run/metrics.json" ] && return 0
  [ -n "$prompt" ] || prompt=$(python -c "import common, sys; print(common.concept_prompts(sys.argv[1])['forget'][0])" "$concept")
  mkdir -p "$OUT"
  mkdir "$run.lock" 2>/dev/null || return 0
  if [ ! -f "$run/summary.json" ]; then
    local work
    work=$(mktemp -d)
    cp -r "$OFFICIAL/utils" "$work/"
    sed -e "s|basemodel_id=\"CompVis/stable-diffusion-v1-4\", torch_dtype|basemodel_id=\"$ROOT/data/tiny-sd\", torch_dtype|" \
        -e "s|height=width=1024|height=width=32|" \
        -e "s|torch_dtype = torch.bfloat16|torch_dtype = torch.float32|" \
        -e "s|^    args = parser.parse_args()|    args = parser.parse_args(); random.seed($seed); torch.manual_seed($seed)|" \
        "$OFFICIAL/esd_sd.py" > "$work/esd_sd.py"
    for pattern in "$ROOT/data/tiny-sd" "height=width=32" "torch.float32" "random.seed($seed)"; do
      grep -qF "$pattern" "$work/esd_sd.py" || { echo "error: patching $OFFICIAL/esd_sd.py failed at $pattern (another version of the file?)" >&2; exit 2; }
    done
    local t0 t1
    t0=$(date +%s.%N)
    (cd "$work" && /usr/bin/time -f "%e s wall, %M KB max RSS" -o time.txt python esd_sd.py --erase_concept "$prompt" \
      --train_method esd-x-strict --lr 1e-3 --iterations 200 --device cpu --save_path out)
    t1=$(date +%s.%N)
    python - "$work" "$run" "$concept" "$seed" "$t0" "$t1" "$prompt" <<'EOF'
import glob, json, os, sys
from safetensors.torch import load_file
import common
work, run, concept, seed, t0, t1, prompt = sys.argv[1:]
trained = load_file(glob.glob(f"{work}/out/*.safetensors")[0])
model = common.load_model("tiny", "cpu", "fp32")
unet = common.trainable_unet(model)
missing = set(trained) - set(unet.state_dict())
assert not missing, f"official parameters not in the UNet: {sorted(missing)[:3]}"
unet.load_state_dict(trained, strict=False)
os.makedirs(run, exist_ok=True)
common.save_unet(unet, os.path.join(run, "unet"))
rss_kb = int(open(f"{work}/time.txt").read().split(",")[1].split()[0])
record = dict(method="esd_official", args=dict(concept=concept, seed=int(seed), lr=1e-3, steps=200, prompt=prompt,
              train_method="esd-x-strict", negative_guidance=2.0), base_model="tiny", world="tiny",
              command=f"esd_sd.py --erase_concept {prompt!r} --train_method esd-x-strict --lr 1e-3 --iterations 200")
common.save_json(os.path.join(run, "args.json"), record)
common.save_json(os.path.join(run, "summary.json"), dict(wall_seconds=float(t1) - float(t0), peak_memory_mb=rss_kb / 1024,
                 trained_parameters=sum(v.numel() for v in trained.values())))
EOF
    rm -rf "$work"
  fi
  [ -f "$run/metrics.json" ] || python eval.py "$run"
  rmdir "$run.lock"
}

for c in "${CLASSES[@]}"; do base_metrics "$c"; done
for seed in "${SEEDS[@]}"; do
  for c in "${CLASSES[@]}"; do
    run_and_eval fdiv.py "$OUT" esd "$c" "$seed" --anchor esd --divergence mse
    # the official script on our forget prompt ("an image of a church"), then on the bare class name ("church")
    official_run esd_official "$c" "$seed" ""
    official_run esd_official-class_name "$c" "$seed" "$c"
  done
done
table "$OUT" --base "${BASE:-runs/bench/base}"
