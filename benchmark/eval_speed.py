"""eval.py's scoring speed: images scored per second for each metric, timed side by side in one process.

    python eval.py tiny                                     # once: the base model's 500 images in runs/base__tiny
    OMP_NUM_THREADS=1 python benchmark/eval_speed.py        # scores runs/base__tiny/images

Scores one image folder with eval.py's own code (`eval.plan` and `eval.score`, the same calls `python eval.py FOLDER
--metrics M` makes) once per metric of eval.METRICS, in alternating rounds sharing one model cache, after one warm-up
round that loads the judge, the CLIP model and the FID reference's features (eval.py loads each once per command, and
computes a reference's features once for all PATHs). So each figure is the per-image cost of the metric itself:
reading the PNGs, the judge (ua), CLIP image features and the cosine with the cached text features (clip), the FID
features of the scored images plus the FID/KID computation against the cached reference features (fid). `all` is
every metric in one call (the judge and CLIP share one read of the images). NSFW (NudeNet) applies to the SD world only
and is reported as not measured here. Generation, which dominates eval.py's time on a run folder, is measured by
benchmark/sampling_speed.py.
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import eval as evaluate  # noqa: E402  (the repository's eval.py, not the builtin)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default=os.path.join("runs", "base__tiny", "images"), help="image folder")
    p.add_argument("--forget_class", default="church", help="forget class for UA/RA and the FID class selection")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (alternating metrics); medians are reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    p.add_argument("--out", default=os.path.join("runs", "bench_speed", "eval_speed.json"), help="result JSON")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1 (got {args.repeats})")
    return args


def main(args):
    import torch

    torch.set_num_threads(args.threads)
    if not os.path.isdir(args.folder):
        raise common.UsageError(f"{args.folder!r} is not a folder; make it with `python eval.py tiny` (or pass one)")
    device = common.resolve_device("cpu")
    scan = evaluate.read_folder(args.folder)
    world = "tiny" if max(scan["size"]) < 256 else "sd"
    metrics = [m for m in evaluate.METRICS if not (m == "nsfw" and world == "tiny")]
    variants = {m: [m] for m in metrics} | {"all": metrics}
    eargs = {name: evaluate.parse_args([args.folder, "--forget_class", args.forget_class, "--metrics", *ms])
             for name, ms in variants.items()}  # fmt: skip
    cache = {}
    jobs = {name: evaluate.plan(args.folder, a, None) for name, a in eargs.items()}
    for name in variants:  # warm-up: models and reference features into the cache
        evaluate.score(jobs[name], scan, eargs[name], device, cache)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            t0 = time.perf_counter()
            evaluate.score(jobs[name], scan, eargs[name], device, cache)
            times[name].append(time.perf_counter() - t0)
    n = len(scan["files"])
    rates = {name: n / float(np.median(t)) for name, t in times.items()}
    for name, rate in rates.items():
        print(f"{name:>5}: {rate:7.1f} images/s ({n} images, median of {args.repeats} rounds)")
    if world == "tiny":
        print(" nsfw: not measured (NudeNet applies to the SD world)")
    record = dict(
        command=" ".join(["python"] + sys.argv),
        folder=os.path.abspath(args.folder),
        n_images=n,
        world=world,
        images_per_second=rates,
        seconds=times,
        threads=args.threads,
        load_average=os.getloadavg(),
        versions=common.versions(),
    )
    common.save_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    common.cli(main, parse_args())
