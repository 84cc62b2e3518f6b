#!/usr/bin/env bash
# The GPU user's path, checked on one CUDA machine without internet in under 8 minutes (nothing is downloaded):
#   1. the four scripts on the tiny world in bf16 on CUDA (short runs), then eval.py's UA/RA on 20 images per class;
#   2. Stable Diffusion's real architecture with random weights (benchmark/sd_architecture.py): every script's SD
#      defaults for 2 steps in bf16, with peak CUDA memory (torch.cuda.max_memory_allocated) and the last step's time.
# One table at the end (also in OUT/gpu_check.md). Run from anywhere, with the requirements installed:
#   bash benchmark/gpu_check.sh [OUT]        (default OUT: runs/gpu_check)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

run() {  # run NAME SCRIPT FLAGS...: a short tiny-world run in bf16 on CUDA, then its UA/RA
  local name=$1 script=$2
  shift 2
  local dir="$OUT/tiny/$name"
  rm -rf "$dir"
  local t0=$SECONDS
  python "$script" --concept church --device cuda --dtype bf16 --out_dir "$dir" "$@" > "$dir.log" 2>&1 \
    || { echo "| $name | failed: $(tail -1 "$dir.log") | | | |" >> "$OUT/tiny.md"; return 0; }
  local train=$((SECONDS - t0))
  python eval.py "$dir" --device cuda --metrics ua --n_per_class 20 > "$dir.eval.log" 2>&1 \
    || { echo "| $name | eval failed: $(tail -1 "$dir.eval.log") | | | |" >> "$OUT/tiny.md"; return 0; }
  python - "$dir" "$name" "$train" >> "$OUT/tiny.md" <<'EOF'
import json, sys
d, name, train = sys.argv[1:4]
m, s = json.load(open(f"{d}/metrics.json")), json.load(open(f"{d}/summary.json"))
acc = m["summary"]
print(f"| {name} | {acc['UA']:.2f} | {acc['RA']:.3f} | {train} | {s['peak_memory_mb'] / 1024:.2f} |")
EOF
}

echo "| tiny world, church, bf16 on CUDA | UA | RA | train (s) | peak memory (GB) |" > "$OUT/tiny.md"
echo "|---|---|---|---|---|" >> "$OUT/tiny.md"
run pure pure.py
run fdiv fdiv.py
run esd fdiv.py --anchor esd --divergence mse
run sfd sfd.py
run rl_critic rl_critic.py --steps 40

[ -f "$OUT/sd_arch/sd/model_index.json" ] || python benchmark/sd_architecture.py build "$OUT/sd_arch"
python benchmark/sd_architecture.py run "$OUT/sd_arch" --steps 2 --device cuda --json "$OUT/sd_arch.json" \
  > "$OUT/sd_arch.md"
rm -rf "$OUT/sd_arch/sd" "$OUT/sd_arch/clip"  # 5.6 GB of random weights

{ cat "$OUT/tiny.md"; echo; echo "Stable Diffusion's architecture (random weights), SD defaults, bf16:"; cat "$OUT/sd_arch.md"; } \
  > "$OUT/gpu_check.md"
cat "$OUT/gpu_check.md"
