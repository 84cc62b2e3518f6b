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
  sketch_filled_cos,      latent_geometry(): a sketch's latent against the filled icon's with the same pose and
  sketch_on_filled,       colours (both minus the bare background's): their cosine and the sketch's projection on
  style_separation        the filled one; and how far apart the two styles' spatially averaged latents are, in
                          latent standard deviations. The committed VAE: 0.85, 0.66 and 0.02, a sketch is encoded as
                          a weaker copy of the filled icon. --style_margin adds a hinge loss that moves style into
                          the latents' spatial mean (0.02, 0.02 and 2.82 at --style_margin 1); a UNet fine-tuned on
                          such latents still lost the style to guidance (data/README.md, "Sketches").

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
    p.add_argument(
        "--style_margin",
        type=float,
        default=0.0,
        help="a hinge loss that makes style a global feature of the latents: along a learned direction, the "
        "spatial mean of a sketch's latent must sit at least this many latent standard deviations from a filled "
        "icon's (0: off)",
    )
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
    if args.style_margin < 0:
        p.error(f"--style_margin must be >= 0 (got {args.style_margin})")
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


def latent_geometry(vae, n: int = 300, seed: int = 0) -> dict:
    """How a sketch's latent relates to the filled icon with the same pose and colours, both taken relative to the
    latent of the bare background: their cosine, and the sketch's projection on the filled direction (0.66 means
    the sketch is encoded as a 0.66-strength copy of the filled icon; first suspected, then ruled out, as the reason
    guidance turns sketches into filled icons: data/README.md, "Sketches"). Also the separation of the two styles'
    spatially averaged latents along their mean difference, in units of the latents' standard deviation."""
    rng = np.random.default_rng(seed)
    params = [pictonette.sample_params(rng) for _ in range(n)]

    def encode(**change) -> torch.Tensor:
        x = to_tensor(np.stack([pictonette.render(dict(p, **change)) for p in params]))
        return vae.encode(x).latent_dist.mean

    with torch.no_grad():
        z_f, z_s, z_b = encode(style="filled"), encode(style="sketch"), encode(style="filled", scale=1e-4)
    a, b = (z_f - z_b).flatten(1), (z_s - z_b).flatten(1)
    m_f, m_s = z_f.mean((2, 3)), z_s.mean((2, 3))
    u = m_s.mean(0) - m_f.mean(0)
    u = u / u.norm()
    sep = ((m_s @ u).mean() - (m_f @ u).mean()) / torch.cat([z_f, z_s]).std()
    return dict(
        sketch_filled_cos=F.cosine_similarity(a, b).mean().item(),
        sketch_on_filled=((a * b).sum(1) / (a * a).sum(1)).mean().item(),
        style_separation=sep.item(),
    )


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
        fig.update(latent_geometry(vae))
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
        is_sketch = torch.cat([-torch.ones(n - n_sketch), torch.ones(n_sketch)])  # hinge labels
        probe = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(args.seed)))
        probe_bias = torch.nn.Parameter(torch.zeros(()))
        opt = torch.optim.AdamW(list(vae.parameters()) + [probe, probe_bias], lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps))
        gen = torch.Generator().manual_seed(args.seed)
        for step in range(args.steps):
            idx = torch.randint(len(pool), (args.batch,), generator=gen)
            x = pool[idx].contiguous(memory_format=torch.channels_last)
            post = vae.encode(x).latent_dist
            z = post.sample(generator=gen)
            rec = vae.decode(z).sample
            err = rec - x
            weight = 1.0  # 60 on the 0-255 scale is 0.47 on [-1, 1]
            if args.fg:
                weight = 1 + args.fg * ((x - background(x)).norm(dim=1, keepdim=True) > 0.47).float()
            loss = (weight * err**2).mean() + 0.5 * (weight * err.abs()).mean()  # build_tiny.py's loss when fg = 0
            loss = loss + args.kl * post.kl().mean() / (4 * 8 * 8)
            if args.style_margin:  # along the unit direction `probe`, sketch and filled means at least 2 margins apart
                score = z.mean((2, 3)) @ (probe / probe.norm()) + probe_bias
                loss = loss + F.relu(args.style_margin * z.detach().std() - is_sketch[idx] * score).mean()
            if args.edge:
                for dim in (2, 3):
                    loss = loss + args.edge * (rec.diff(dim=dim) - x.diff(dim=dim)).abs().mean()
            train_step(opt, sched, loss, clip_params=vae.parameters())
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                figures.append(evaluate(step + 1, t0))
        vae = vae.to(memory_format=torch.contiguous_format).eval()
        with torch.no_grad():  # build_tiny.build_vae's convention: unit-variance latents on held-out images
            x = to_tensor(pictonette.make(1000, seed=1001)["images"])
            vae.register_to_config(scaling_factor=float(1.0 / vae.encode(x).latent_dist.sample(generator=gen).std()))
        vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(dict(args=vars(args), figures=figures), f, indent=1)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))


if __name__ == "__main__":
    main(parse_args())
