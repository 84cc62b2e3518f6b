"""Does a 32x32 -> 4x8x8 VAE keep Pictonette's 1-pixel sketch lines? Train a candidate (or load one) and measure it.

    python benchmark/vae_lines.py committed --init data/tiny-sd/vae --steps 0        # measure the committed VAE
    python benchmark/vae_lines.py ft --init data/tiny-sd/vae --fg 4 --edge 1 --sketch_frac 0.5 --steps 1000 \\
        --batch 32 --lr 5e-4                                                        # fine-tune it with line-aware loss
    python benchmark/vae_lines.py wide --widths 64,128,128 --steps 2500 --batch 64  # a new design from scratch

Issue 2's sketch bar needs a VAE whose latents carry thin lines (data/README.md, "Sketches"). This script is the test
bench for candidate designs: the loss is build_tiny.py's (MSE + 0.5 L1 + a small KL) plus two optional terms, a
weight on the pixels that differ from the background (`--fg`) and an L1 on image gradients (`--edge`). It writes
runs/vae_lines/NAME/: results.json (the figures below every --eval_every steps), sketches.png (16 held-out sketches
over their reconstructions, 3x) and vae/ (diffusers format). Figures, on 200 held-out images per style:

  mse_sketch, mse_filled  reconstruction MSE on [-1, 1]
  line_contrast           on the sketch's line pixels (colour > 60 from the background, L2 on 0-255 RGB), the
                          reconstruction's mean distance from the background over the real image's: 1 is perfect
  halo                    the same mean on the pixels next to a line pixel (not on one), over the real image's mean
                          on the line: a real sketch has 0.09 (anti-aliasing); a VAE that smears lines into the gaps
                          between them, drawing soft filled shapes, has a high halo

Measured (--steps 0 on the saved VAEs), sketch line_contrast / halo: committed VAE 0.63 / 0.36; fine-tuned from it
with --fg 4 --edge 1 (1,000 steps at batch 32 on half sketches, then 1,500 on 70%) 0.91 / 0.45; the design trained
from scratch with the same loss for 1,500 steps at batch 16: 0.81 / 0.61. Stronger lines, but the halo stays: at
32x32 the gaps between an icon's lines are 1-2 pixels, and these VAEs fill them.

Run it with OMP_NUM_THREADS=1 next to other jobs; one step at batch 64 takes about 2.5 s on one thread for the
committed design (32, 64, 64), 6.9 s for (64, 128, 128).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "data"))

import pictonette  # noqa: E402
from build_tiny import cosine_lr, to_tensor, to_uint8, train_step  # noqa: E402

import common  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="output folder runs/vae_lines/NAME")
    p.add_argument("--init", default=None, help="start from this diffusers VAE folder (default: a new one)")
    p.add_argument("--widths", default="32,64,64", help="block_out_channels of a new VAE (committed: 32,64,64)")
    p.add_argument("--layers_per_block", type=int, default=1, help="resnet layers per block of a new VAE (built: 1)")
    p.add_argument("--fg", type=float, default=0.0, help="extra loss weight on pixels that differ from the background")
    p.add_argument("--edge", type=float, default=0.0, help="weight of the L1 between image gradients")
    p.add_argument("--kl", type=float, default=1e-4, help="weight of the per-element KL (build_tiny.py: 1e-4)")
    p.add_argument("--sketch_frac", type=float, default=0.3, help="share of sketches in the training pool")
    p.add_argument("--steps", type=int, default=1000, help="training steps (0: only measure --init)")
    p.add_argument("--batch", type=int, default=32, help="images per step")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine schedule with warmup)")
    p.add_argument("--eval_every", type=int, default=250, help="measure the figures every N steps")
    p.add_argument("--seed", type=int, default=0, help="seeds the new VAE, the batches and the posterior samples")
    args = p.parse_args(argv)
    if args.steps == 0 and not args.init:
        p.error("--steps 0 only measures a VAE: give it one with --init")
    try:
        args.widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        p.error(f"--widths must be comma-separated integers such as 32,64,64 (got {args.widths!r})")
    for name in ["steps", "layers_per_block", "batch", "eval_every"]:
        if getattr(args, name) < (0 if name == "steps" else 1):
            p.error(f"--{name} must be >= {0 if name == 'steps' else 1} (got {getattr(args, name)})")
    if any(w < 32 or w % 32 for w in args.widths):
        p.error(f"--widths must be multiples of 32, as the VAE's GroupNorm has 32 groups (got {args.widths})")
    if not 0 <= args.sketch_frac <= 1:
        p.error(f"--sketch_frac must be in [0, 1] (got {args.sketch_frac})")
    return args


def background(x: torch.Tensor) -> torch.Tensor:
    """Per image the median colour of the 2-pixel border, (N, 3, 1, 1), as pictonette draws a plain background."""
    edges = [x[:, :, :2], x[:, :, -2:], x[:, :, :, :2], x[:, :, :, -2:]]
    return torch.cat([e.flatten(2) for e in edges], 2).median(2).values[:, :, None, None]


def line_figures(real: np.ndarray, rec: np.ndarray) -> dict:
    """line_contrast and halo (module docstring) of uint8 reconstructions `rec` of real sketches `real`."""
    bg = background(torch.from_numpy(real).permute(0, 3, 1, 2).float()).permute(0, 2, 3, 1).numpy()
    d_real = np.linalg.norm(real.astype(float) - bg, axis=-1)
    d_rec = np.linalg.norm(rec.astype(float) - bg, axis=-1)
    line = d_real > 60
    beside = np.stack([ndimage.binary_dilation(m) for m in line]) & ~line  # 4-neighbours of a line pixel
    on_line = d_real[line].mean()
    return dict(line_contrast=float(d_rec[line].mean() / on_line), halo=float(d_rec[beside].mean() / on_line))


def main(args):
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(args.seed)
    out = os.path.join(ROOT, "runs", "vae_lines", args.name)
    os.makedirs(out, exist_ok=True)
    if args.init:
        vae = AutoencoderKL.from_pretrained(args.init)
    else:
        vae = AutoencoderKL(  # build_tiny.build_vae's design, with the widths and depth as flags
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            sample_size=32,
            layers_per_block=args.layers_per_block,
            norm_num_groups=32,
            block_out_channels=args.widths,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
        )
    print(f"vae_lines: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    held = {s: pictonette.make(200, seed=1006 + i, style=s)["images"] for i, s in enumerate(pictonette.STYLES)}

    def evaluate(step: int, t0: float) -> dict:
        vae.eval()
        fig = dict(step=step, seconds=round(time.time() - t0))
        with torch.no_grad():
            for style, images in held.items():
                x = to_tensor(images)
                rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
                fig[f"mse_{style}"] = F.mse_loss(rec, x).item()
                if style == "sketch":
                    fig.update(line_figures(images, to_uint8(rec)))
                    rows = [np.concatenate(list(im[:16]), 1) for im in (images, to_uint8(rec))]
                    grid = Image.fromarray(np.concatenate(rows))
                    grid = grid.resize((grid.width * 3, grid.height * 3), Image.Resampling.NEAREST)
                    grid.save(os.path.join(out, "sketches.png"))
        vae.train()
        print(json.dumps(fig), flush=True)
        return fig

    t0 = time.time()
    figures = [evaluate(0, t0)]
    if args.steps:
        n = min(args.steps * args.batch, 60000)
        n_sketch = round(n * args.sketch_frac)
        pool = torch.cat(
            [
                to_tensor(pictonette.make(n - n_sketch, seed=1, style="filled")["images"]),
                to_tensor(pictonette.make(n_sketch, seed=2, style="sketch")["images"]),
            ]
        )
        vae = vae.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps))
        gen = torch.Generator().manual_seed(args.seed)
        for step in range(args.steps):
            x = pool[torch.randint(len(pool), (args.batch,), generator=gen)]
            x = x.contiguous(memory_format=torch.channels_last)
            post = vae.encode(x).latent_dist
            rec = vae.decode(post.sample(generator=gen)).sample
            err = rec - x
            weight = 1.0  # 60 on the 0-255 scale is 0.47 on [-1, 1]
            if args.fg:
                weight = 1 + args.fg * ((x - background(x)).norm(dim=1, keepdim=True) > 0.47).float()
            loss = (weight * err**2).mean() + 0.5 * (weight * err.abs()).mean()  # build_tiny.py's loss when fg = 0
            loss = loss + args.kl * post.kl().mean() / (4 * 8 * 8)
            if args.edge:
                for dim in (2, 3):
                    loss = loss + args.edge * (rec.diff(dim=dim) - x.diff(dim=dim)).abs().mean()
            train_step(opt, sched, loss, clip_params=vae.parameters())
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                figures.append(evaluate(step + 1, t0))
        vae = vae.to(memory_format=torch.contiguous_format)
        vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(dict(args=vars(args), figures=figures), f, indent=1)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))


if __name__ == "__main__":
    main(parse_args())
