"""Multi-process generation: `torchrun --nproc_per_node 2` (CPU, gloo) vs 1 process on a 1,000-image set.

    python benchmark/multiprocess_generation.py                 # 10 prompt rows x 100 images = 1,000 images

Generates the standard evaluation prompts (data/prompts/imagenette.csv: "an image of a {class}", 10 rows) with
`--n_per_prompt` images each through common.generate (25 DDIM steps, guidance 7.5, batches of 64), first in one
process, then with `torchrun --standalone --nproc_per_node N`, each process on one thread (OMP_NUM_THREADS=1), into
separate folders under --out; checks that the two folders hold byte-identical PNG files; reports the ratio of the
wall times (1 process / N processes) both for the whole command (process start, model loading, generation) and for
common.generate alone (rank 0's clock, which includes the final barrier, so it waits for every process). `--rounds 2`
alternates the two twice (fresh folders each time). The machine's other load counts: its load average is printed.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


def worker(model: str, prompts: str, out: str, n: int, timing: str) -> None:
    """One process's share (all of it when not under torchrun); rank 0 writes the time common.generate took."""
    import torch

    torch.set_num_threads(1)
    m = common.load_model(model, device="cpu")
    t0 = time.perf_counter()
    common.generate(m, prompts, out, n_per_prompt=n, progress=False)
    seconds = time.perf_counter() - t0
    if common.dist_info()[0] == 0:
        common.save_json(timing, dict(generate_seconds=seconds, world_size=common.dist_info()[1]))


def pngs(folder: str) -> dict:
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".png")}


def run(nproc: int, args, out: str) -> dict:
    timing = out + ".timing.json"
    cmd = [os.path.abspath(__file__), "--worker", args.model, args.prompts, out, str(args.n_per_prompt), timing]
    if nproc == 1:
        cmd = [sys.executable, *cmd]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise common.UsageError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return dict(processes=nproc, wall_seconds=wall, **json.load(open(timing)))


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="model to sample (tiny, hub id, folder)")
    p.add_argument("--prompts", default=os.path.join(common.PROMPTS_DIR, "imagenette.csv"), help="prompt file")
    p.add_argument("--n_per_prompt", type=int, default=100, help="images per prompt row (10 rows: 1,000 images)")
    p.add_argument("--nproc", type=int, default=2, help="processes of the torchrun run")
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of (1 process, N processes)")
    p.add_argument("--out", default=os.path.join("runs", "bench_speed", "multiprocess_generation"), help="folder")
    args = p.parse_args(argv)
    for name in ("n_per_prompt", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    if args.nproc < 2:
        p.error(f"--nproc must be >= 2 (got {args.nproc})")
    return args


def main(args):
    common.read_prompts(args.prompts)  # a clear error for a bad prompt file before any process starts
    rounds = []
    for k in range(args.rounds):
        one, many = os.path.join(args.out, f"r{k}_1proc"), os.path.join(args.out, f"r{k}_{args.nproc}proc")
        for folder in (one, many):
            if os.path.exists(folder):
                shutil.rmtree(folder)
        a = run(1, args, one)
        b = run(args.nproc, args, many)
        files_a, files_b = pngs(one), pngs(many)
        identical = len(files_a) > 0 and files_a == files_b
        rounds.append(
            dict(
                one=a,
                many=b,
                images=len(files_a),
                identical=identical,
                ratio_wall=a["wall_seconds"] / b["wall_seconds"],
                ratio_generate=a["generate_seconds"] / b["generate_seconds"],
                load_average=os.getloadavg(),
            )
        )
        r = rounds[-1]
        print(
            f"round {k}: {r['images']} images; 1 process {a['wall_seconds']:.0f} s (generate "
            f"{a['generate_seconds']:.0f} s), {args.nproc} processes {b['wall_seconds']:.0f} s (generate "
            f"{b['generate_seconds']:.0f} s); speed-up "
            f"{r['ratio_wall']:.2f}x whole command, {r['ratio_generate']:.2f}x generation; identical files: "
            f"{identical}; load average {r['load_average'][0]:.1f}"
        )
    record = dict(command=" ".join(["python"] + sys.argv), nproc=args.nproc, rounds=rounds, versions=common.versions())
    common.save_json(os.path.join(args.out, "result.json"), record)
    print(f"wrote {os.path.join(args.out, 'result.json')}")
    if not all(r["identical"] for r in rounds):
        raise common.UsageError("1 and N processes wrote different files (see above)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        if len(sys.argv) != 7:
            sys.exit("usage: multiprocess_generation.py --worker MODEL PROMPTS OUT N_PER_PROMPT TIMING_JSON")
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        common.cli(main, parse_args())
