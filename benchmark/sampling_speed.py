"""Sampling speed: common.py's sampler vs diffusers' StableDiffusionPipeline, same images, side by side.

    python benchmark/sampling_speed.py --batch_size 64 --repeats 3

Both sample the same prompts and seeds (25 DDIM steps, guidance 7.5) on the same model; the outputs are checked to
be identical, and the two are timed alternately in one process (machines here are noisy), reporting the ratio
of images per second.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model to sample (tiny, hub id, folder)")
    p.add_argument("--batch_size", type=int, default=64, help="images per batch")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of each sampler (alternating)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    args = p.parse_args()
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    model = common.load_model(args.model)
    pipe = StableDiffusionPipeline.from_pretrained(model.path, torch_dtype=model.dtype).to(model.device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    classes = common.IMAGENETTE
    prompts = [f"an image of a {classes[i % 10]}" for i in range(args.batch_size)]
    seeds = list(range(args.batch_size))

    def ours():
        cond = common.encode_prompts(model, prompts)
        with torch.no_grad():
            z = common.sample(model, cond, common.initial_latents(model, seeds), args.steps, 7.5)
        return common.decode(model, z)

    def theirs():
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        out = pipe(prompts, num_inference_steps=args.steps, guidance_scale=7.5, generator=gens, output_type="np")
        return (out.images * 255).round().astype(np.uint8)

    same = np.array_equal(ours(), theirs())  # also warms both up
    times = {"common": [], "diffusers": []}
    for _ in range(args.repeats):
        for name, fn in (("common", ours), ("diffusers", theirs)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_ours, t_theirs = np.median(times["common"]), np.median(times["diffusers"])
    print(f"model {args.model}, batch {args.batch_size}, {args.steps} steps, {args.repeats} alternating rounds")
    print(f"identical images: {same}")
    print(
        f"common.sample: {args.batch_size / t_ours:.1f} images/s; StableDiffusionPipeline: "
        f"{args.batch_size / t_theirs:.1f} images/s; ratio (common / diffusers) {t_theirs / t_ours:.2f}x"
    )


if __name__ == "__main__":
    main()
