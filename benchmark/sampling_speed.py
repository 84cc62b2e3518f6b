"""Sampling speed: common.generate vs diffusers' StableDiffusionPipeline, same images, side by side in one process.

    OMP_NUM_THREADS=1 python benchmark/sampling_speed.py                      # batch 1 and batch 64 (the default)
    OMP_NUM_THREADS=1 python benchmark/sampling_speed.py --batch_sizes 64 --images 128 --repeats 5

For each batch size, both write the same PNG files (prompt "an image of a {class}" cycling over the 10 classes,
image i from seed i, 25 DDIM steps, guidance 7.5) into a fresh temporary folder: `common.generate` from a prompt
file, and the pipeline called on `batch` prompts at a time with one CPU generator per image, its images saved with
PIL as common.generate saves them (common.generate also caches prompt encodings across calls; the pipeline encodes
its prompts at every call: 2 text-encoder passes per batch against 50 UNet passes). The files are checked to be
pixel-identical, then the two are timed alternately (`--repeats` rounds, the order swapped every round; medians), so
load changes on a shared machine hit both alike. Prints and writes (to --out) images per second of each and the ratio
common / diffusers (> 1: common.generate is faster).
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


def prompt_rows(n: int) -> list[dict]:
    classes = common.IMAGENETTE
    return [dict(case_number=i, prompt=f"an image of a {classes[i % 10]}", evaluation_seed=i) for i in range(n)]


def read_pngs(folder: str) -> dict:
    return {
        f: np.asarray(Image.open(os.path.join(folder, f)).convert("RGB"))
        for f in sorted(os.listdir(folder))
        if f.endswith(".png")
    }


def same_images(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and len(a) > 0 and all(np.array_equal(a[k], b[k]) for k in a)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model to sample (tiny, hub id, folder)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64], help="images per batch (64: the default)")
    p.add_argument("--images", type=int, default=None, help="images per timed round (default: max(batch, 8))")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of each sampler (alternating)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    p.add_argument("--out", default=os.path.join("runs", "bench_speed", "sampling_speed.json"), help="result JSON")
    args = p.parse_args(argv)
    for name in ("images", "repeats", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if min(args.batch_sizes) < 1:
        p.error(f"--batch_sizes must be >= 1 (got {args.batch_sizes})")
    return args


def write_with_pipeline(pipe, rows: list[dict], out: str, batch: int, steps: int) -> None:
    """The pipeline's images for `rows` (one CPU generator per image, seeded as common.generate does), as PNGs."""
    os.makedirs(out)
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        gens = [torch.Generator().manual_seed(r["evaluation_seed"]) for r in chunk]
        images = pipe(
            [r["prompt"] for r in chunk],
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=gens,
            output_type="np",
        ).images
        for r, img in zip(chunk, (images * 255).round().astype(np.uint8)):
            Image.fromarray(img).save(os.path.join(out, f"{r['case_number']}_0.png"), format="PNG")


def measure(model, pipe, batch: int, n: int, steps: int, repeats: int) -> dict:
    """Identical-output check, then alternating timed rounds of common.generate and the pipeline at one batch size."""
    rows = prompt_rows(n)
    tmp = tempfile.mkdtemp(prefix="sampling_speed_")
    try:
        prompts_csv = os.path.join(tmp, "prompts.csv")
        common.write_prompts(prompts_csv, rows)
        samplers = {
            "common": lambda out: common.generate(
                model, prompts_csv, out, steps=steps, batch_size=batch, progress=False
            ),
            "diffusers": lambda out: write_with_pipeline(pipe, rows, out, batch, steps),
        }
        for name, fn in samplers.items():  # also warms both up
            fn(os.path.join(tmp, f"check_{name}"))
        same = same_images(*(read_pngs(os.path.join(tmp, f"check_{name}")) for name in samplers))
        times = {name: [] for name in samplers}
        for k in range(repeats):
            order = list(samplers.items())
            for name, fn in order if k % 2 == 0 else order[::-1]:  # ABBA: neither always goes first
                t0 = time.perf_counter()
                fn(os.path.join(tmp, f"{name}_{k}"))
                times[name].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp)
    t_ours, t_theirs = float(np.median(times["common"])), float(np.median(times["diffusers"]))
    return dict(
        batch_size=batch,
        images=n,
        identical=same,
        common_images_per_second=n / t_ours,
        diffusers_images_per_second=n / t_theirs,
        ratio_common_over_diffusers=t_theirs / t_ours,
        seconds=times,
    )


def main(args):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    model = common.load_model(args.model)
    pipe = StableDiffusionPipeline.from_pretrained(model.path, torch_dtype=model.dtype).to(model.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    results = []
    for batch in args.batch_sizes:
        r = measure(model, pipe, batch, args.images or max(batch, 8), args.steps, args.repeats)
        results.append(r)
        print(
            f"batch {batch}, {r['images']} images, {args.steps} steps, {args.repeats} alternating rounds: identical "
            f"images {r['identical']}; common.generate {r['common_images_per_second']:.2f} images/s, "
            f"StableDiffusionPipeline {r['diffusers_images_per_second']:.2f} images/s; ratio (common / "
            f"diffusers) {r['ratio_common_over_diffusers']:.2f}x"
        )
    record = dict(
        command=" ".join(["python"] + sys.argv),
        model=args.model,
        steps=args.steps,
        threads=args.threads,
        load_average=os.getloadavg(),
        results=results,
        versions=common.versions(),
    )
    common.save_json(args.out, record)
    print(f"wrote {args.out}")
    if not all(r["identical"] for r in results):
        raise common.UsageError("common.generate and the pipeline gave different images (see above)")


if __name__ == "__main__":
    common.cli(main, parse_args())
