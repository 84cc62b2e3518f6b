"""How often does "a sketch of a {class}" give an outline image, at several guidance scales?

    python benchmark/sketch_rate.py                                  # the committed data/ folder
    python benchmark/sketch_rate.py --data /tmp/candidate/data --guidance 1 2 4 7.5 12

Issue 2's style bar is measured by build_tiny.py's report stage at guidance 7.5 only. This script measures the same
rate, with the same style judge (a small CNN trained on the VAE's reconstructions of 2,000 real sketches and 2,000
real filled icons, build_tiny.train_style_judge), at each --guidance, sampled as the report samples (plain
StableDiffusionPipeline, 25 DDIM steps, 32x32, seeds 0..n-1 per class), for the sketch prompt and for the plain
prompt "an image of a {class}" (a model that draws faint images everywhere raises both). It also prints the VAE's
latent geometry (vae_lines.latent_geometry): how far a sketch's latent is a weaker copy of the filled icon's.

Measured on the committed build (data/README.md, "Sketches"): the sketch prompt gives outlines 0.98 / 0.99 / 0.805 /
0.315 of the time at guidance 1 / 2 / 4 / 7.5; the unguided "outlines" are faint blobs rather than drawings, and
guided ones soft filled icons.
"""

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))

import pictonette  # noqa: E402
from build_tiny import sample_pipeline, to_tensor, train_style_judge  # noqa: E402
from vae_lines import latent_geometry  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data"), help="a tiny-world folder holding tiny-sd/")
    p.add_argument("--guidance", nargs="+", type=float, default=[1.0, 2.0, 4.0, 7.5], help="guidance scales")
    p.add_argument(
        "--negative_prompt",
        nargs="*",
        default=[],
        help='also sample the sketch prompt at guidance 7.5 against these negative prompts (e.g. "a sketch of a")',
    )
    p.add_argument("--n", type=int, default=20, help="seeds per class (the report: 20)")
    p.add_argument("--judge_train", type=int, default=2000, help="real images per style for the style judge")
    p.add_argument("--output", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.data, "tiny-sd", "model_index.json")):
        p.error(f"--data must be a folder with a diffusers tiny-sd/ inside (got {args.data!r})")
    if args.n < 1 or args.judge_train < 2:
        p.error(f"--n must be >= 1 and --judge_train >= 2 (got {args.n}, {args.judge_train})")
    if any(not g >= 1.0 for g in args.guidance):
        p.error(f"--guidance values must be >= 1 (got {args.guidance})")
    return args


def main(args) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(args.data, "tiny-sd"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    judge, judge_acc = train_style_judge(
        pipe.vae, n_train=args.judge_train, seed=1006, steps=min(600, 6 * args.judge_train)
    )
    figures = dict(style_judge_acc_on_vae_recon=judge_acc, **latent_geometry(pipe.vae), rates={})
    for template in ["a sketch of a {}", "an image of a {}"]:
        prompts = [template.format(c) for c in pictonette.CLASSES for _ in range(args.n)]
        seeds = [s for _ in pictonette.CLASSES for s in range(args.n)]
        for g in args.guidance:
            with torch.no_grad():
                logits = judge(to_tensor(sample_pipeline(pipe, prompts, seeds, guidance=g))).squeeze(1)
            figures["rates"][f"{template.format('{class}')} @ {g:g}"] = (logits > 0).float().mean().item()
    prompts = [f"a sketch of a {c}" for c in pictonette.CLASSES for _ in range(args.n)]
    seeds = [s for _ in pictonette.CLASSES for s in range(args.n)]
    for negative in args.negative_prompt:  # guidance away from the style alone: what does the class direction add?
        with torch.no_grad():
            logits = judge(to_tensor(sample_pipeline(pipe, prompts, seeds, negative=negative))).squeeze(1)
        figures["rates"][f"a sketch of a {{class}} @ 7.5, negative {negative!r}"] = (logits > 0).float().mean().item()
    print(json.dumps(figures, indent=1))
    if args.output:
        common.atomic_write(args.output, lambda f: json.dump(figures, f, indent=1))
    return figures


if __name__ == "__main__":
    main(parse_args())
