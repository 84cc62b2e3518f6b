"""One point of a hyperparameter sweep: train a method with the given flags, then judge 20 images per class.

    python benchmark/sweep.py pure x_t30_lr3 --train_params xattn --kl_weighting true --kl_weight 30 --lr 3e-4

Trains into runs/sweep/{name} (reused if it already has unet/), prints the tiny judge's per-class accuracy on "an
image of a {class}" (common.tiny_judge_accuracies: 20 evaluation seeds per class) and appends it to
runs/sweep/results.jsonl. `name` BASE judges the base model. Quicker and noisier than eval.py (one image in 20 is
5 points); the README's sweep tables come from this script. Run it with OMP_NUM_THREADS=1 next to other jobs.
"""

import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402


def main(argv):
    if len(argv) < 2:
        sys.exit("usage: python benchmark/sweep.py {pure,fdiv,...} NAME [FLAGS...]")
    method, name, flags = argv[0], argv[1], argv[2:]
    out = os.path.join(ROOT, "runs", "sweep", name)
    model = common.load_model("tiny")
    if name == "BASE":
        unet = model.unet
    else:
        if not os.path.isdir(os.path.join(out, "unet")):
            module = importlib.import_module(method)
            module.main(module.parse_args(flags + ["--out_dir", out]))
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
    classes = [r["class"] for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))]
    acc = common.tiny_judge_accuracies(model, [unet], classes, 20)[0]
    result = dict(method=method, name=name, flags=flags, accuracy=acc)
    print(json.dumps(result))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(os.path.join(ROOT, "runs", "sweep", "results.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
