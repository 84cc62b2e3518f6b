"""Time-to-forget: training time until UA >= 95% for each method, next to the ESD baseline, on one concept and seed.

    OMP_NUM_THREADS=1 python benchmark/time_to_forget.py                      # church, seed 0, every method
    OMP_NUM_THREADS=1 python benchmark/time_to_forget.py --methods esd pure   # some of them

Each method runs in this process with its default flags (the method script's own `main`, imported, not edited) and
`--save_every K`: every K steps the script saves its UNet through `common.save_unet`, which this benchmark replaces
by a judge: the tiny judge (common.tiny_judge_accuracies) classifies `--n_judge` images of "an image of a {concept}"
(25 DDIM steps, guidance 7.5; one step for SFD's generator) and UA = 1 - accuracy. The first checkpoint with
UA >= --ua_bar stops the run; a run that never gets there is reported as "not reached in N steps" (N = the method's
default budget, the one its README results use). The weights are not written (nothing here needs them), and neither
are the checkpoints for --resume.

Two times per checkpoint, neither counting the judging:
- `train_seconds`: the sum of the script's own per-step timers up to the checkpoint (metrics.jsonl's sec_per_step,
  logged once per checkpoint window): the training loop alone;
- `wall_seconds`: wall clock from the start of the script's `main` to the checkpoint, minus the time spent in the
  judge: the loop plus model loading, cached image sets (fdiv, ESD, PURE make them before the first step) and the
  reward model (RL critic).
At the checkpoint that reaches the bar the other classes are judged too (RA, same images per class), so a method
that forgets by breaking everything shows it. Results: OUT/{method}.json per method (a finished method is skipped
when the script is started again) and OUT/table.md. The runs share one process in sequence, so their times depend on
the machine's load at the time: read the ratios to ESD with the load average printed next to them.
"""

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

# name -> (method script, extra flags, judge every K of the script's logged steps, what a logged step is). Budgets are
# the scripts' default --steps: 200 (fdiv, ESD), 100 forget steps = 150 updates (PURE), 100 (SFD), 80 iterations (RL;
# 40 before c729625, when the README's time-to-forget table was measured).
METHODS = {
    "esd": ("fdiv", ["--anchor", "esd", "--divergence", "mse"], 20, "steps"),
    "fdiv-hellinger": ("fdiv", [], 20, "steps"),
    "pure": ("pure", [], 15, "updates"),  # one cycle of 10 forget + 5 repair updates
    "sfd": ("sfd", [], 10, "steps"),
    "rl_critic": ("rl_critic", [], 4, "iterations"),
    "rl_critic-nocritic": ("rl_critic", ["--advantage", "none"], 4, "iterations"),  # DDPO's normalisation, no critic
}


class Reached(Exception):
    """Raised from the judge to stop a run at the first checkpoint that meets the bar."""


def last_logged_step(metrics_path: str) -> int:
    with open(metrics_path) as f:
        lines = [ln for ln in f if ln.strip()]
    if not lines:
        raise ValueError(f"{metrics_path} has no logged step yet")
    return int(json.loads(lines[-1])["step"])


def loop_seconds(metrics_path: str, upto: int) -> float:
    """Seconds the training loop spent in steps 1..upto: sum over metrics.jsonl lines of sec_per_step x the steps the
    line covers (the steps since the previous line). The lines must reach `upto` exactly."""
    total, prev = 0.0, 0
    with open(metrics_path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            step = int(row["step"])
            if step > upto:
                break
            if "sec_per_step" not in row:
                raise ValueError(f"{metrics_path}: line for step {step} has no sec_per_step")
            total += row["sec_per_step"] * (step - prev)
            prev = step
    if prev != upto:
        raise ValueError(f"{metrics_path}: no line for step {upto} (last logged step {prev}); log at every checkpoint")
    return total


def first_reached(curve: list[dict], bar: float) -> dict | None:
    """The first checkpoint of a curve [{step, UA, ...}, ...] (in step order) with UA >= bar, or None."""
    return next((c for c in curve if c["UA"] >= bar), None)


def judge_ua(model, unet, concept: str, n: int, t_init) -> float:
    was_training = unet.training
    unet.eval()
    acc = common.tiny_judge_accuracies(model, [unet], [concept], n, t_init=t_init)[0][concept]
    unet.train(was_training)
    return round(1.0 - acc, 6)  # the judge's accuracy is a float32 mean: 19 of 20 must give exactly 0.95


def run_method(name: str, args, judge_model) -> dict:
    script, flags, every, unit = METHODS[name]
    run = os.path.join(args.out, f"{name}__{args.concept.replace(' ', '_')}__s{args.seed}")
    if os.path.exists(run):  # a run stopped earlier: start it again from scratch
        shutil.rmtree(run)
    module = importlib.import_module(script)
    argv = ["--concept", args.concept, "--seed", str(args.seed), "--out_dir", run, "--sample_every", "0"]
    argv += ["--save_every", str(every), "--log_every", str(every), *flags]
    argv += ["--steps", str(args.steps[name])] if name in args.steps else []
    margs = module.parse_args(argv)
    t_init = getattr(margs, "t_init", None) if script == "sfd" else None
    curve, state = [], dict(judging=0.0, t0=None)
    metrics = os.path.join(run, "metrics.jsonl")
    original_save_unet, original_save_checkpoint = common.save_unet, common.save_checkpoint

    def judge(unet, path):  # replaces common.save_unet: called at every K-th step and at the last
        now = time.perf_counter()
        step = last_logged_step(metrics)  # the scripts log (log_every = K) before they save
        ua = judge_ua(judge_model, unet, args.concept, args.n_judge, t_init)
        point = dict(
            step=step,
            UA=ua,
            train_seconds=loop_seconds(metrics, step),
            wall_seconds=now - state["t0"] - state["judging"],
        )
        curve.append(point)
        print(f"time_to_forget {name} {unit[:-1]} {step}: UA {ua:.3f} after {point['train_seconds']:.0f} s of training")
        if ua >= args.ua_bar:
            others = [c for c in common.IMAGENETTE if c != args.concept]
            acc = common.tiny_judge_accuracies(judge_model, [unet.eval()], others, args.n_judge, t_init=t_init)[0]
            point["RA"] = sum(acc.values()) / len(acc)
            point["per_class"] = acc
            raise Reached
        state["judging"] += time.perf_counter() - now

    common.save_unet, common.save_checkpoint = judge, lambda *a, **k: None
    state["t0"] = time.perf_counter()
    try:
        module.main(margs)
    except Reached:
        pass
    finally:
        common.save_unet, common.save_checkpoint = original_save_unet, original_save_checkpoint
    reached = first_reached(curve, args.ua_bar)
    return dict(
        method=name,
        script=script,
        flags=flags,
        concept=args.concept,
        seed=args.seed,
        steps_flag=args.steps.get(name, margs.steps),
        unit=unit,
        last_step=curve[-1]["step"] if curve else None,
        judge_every=every,
        n_judge=args.n_judge,
        ua_bar=args.ua_bar,
        reached=reached,
        curve=curve,
        load_average=os.getloadavg(),
        git_commit=common.git_commit(),
    )


def table(results: dict, baseline: str = "esd") -> str:
    """Markdown: per method the step, training-loop time and wall time at which UA first reached the bar, RA there,
    and the times over the baseline's."""
    base = (results.get(baseline) or {}).get("reached")
    lines = [
        "| method | UA >= bar first at | training loop (s) | wall, judging excluded (s) | loop / ESD | wall / ESD "
        "| UA there | RA there | last UA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        hit, last = r["reached"], r["curve"][-1] if r["curve"] else None
        last_ua = f"{last['UA']:.2f} (step {last['step']})" if last else "n/a"
        if hit is None:
            never = f"not reached in {r['last_step']} {r['unit']}"
            lines.append(f"| {name} | {never} | - | - | - | - | - | - | {last_ua} |")
            continue
        ratio = (
            (f"{hit['train_seconds'] / base['train_seconds']:.2f}", f"{hit['wall_seconds'] / base['wall_seconds']:.2f}")
            if base
            else ("n/a", "n/a")
        )
        lines.append(
            f"| {name} | {hit['step']} {r['unit']} | {hit['train_seconds']:.0f} | {hit['wall_seconds']:.0f} "
            f"| {ratio[0]} | {ratio[1]} | {hit['UA']:.2f} | {hit.get('RA', math.nan):.2f} | {last_ua} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods to time")
    p.add_argument("--concept", default="church", help="Imagenette class to forget")
    p.add_argument("--seed", type=int, default=0, help="the methods' --seed")
    p.add_argument("--n_judge", type=int, default=20, help="judged images per class at each checkpoint")
    p.add_argument("--ua_bar", type=float, default=0.95, help="UA that counts as forgotten")
    p.add_argument(
        "--steps",
        nargs="*",
        default=[],
        metavar="METHOD=N",
        help="another --steps for a method's script (default: the script's default), e.g. esd=40 for a quick check",
    )
    p.add_argument("--out", default=os.path.join("runs", "bench_speed", "time_to_forget"), help="output folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1)")
    args = p.parse_args(argv)
    if common.imagenette_class(args.concept) is None:
        p.error(f"--concept {args.concept!r} is not an Imagenette class ({', '.join(common.IMAGENETTE)})")
    args.concept = common.imagenette_class(args.concept)
    if args.n_judge < 1:
        p.error(f"--n_judge must be >= 1 (got {args.n_judge})")
    if not 0 < args.ua_bar <= 1:
        p.error(f"--ua_bar must be in (0, 1] (got {args.ua_bar})")
    budgets = {}
    for item in args.steps:
        name, _, value = item.partition("=")
        if name not in METHODS or not value.isdigit() or int(value) < 1:
            p.error(f"--steps {item!r}: expected METHOD=N with METHOD in {', '.join(METHODS)} and N >= 1")
        budgets[name] = int(value)
    args.steps = budgets
    return args


def main(args):
    import torch

    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the method scripts' relative paths (runs/.cache) as when started from the repository root
    os.makedirs(args.out, exist_ok=True)
    judge_model = common.load_model("tiny", device="cpu")
    results = {}
    for name in args.methods:
        path = os.path.join(args.out, f"{name}.json")
        if os.path.isfile(path):
            results[name] = json.load(open(path))
            print(f"time_to_forget {name}: done before ({path})")
            continue
        try:
            results[name] = run_method(name, args, judge_model)
        except Exception as e:  # noqa: BLE001 -- one method failing must not lose the others' results
            print(f"time_to_forget {name}: failed ({type(e).__name__}: {e}); not saved, run the script again")
            continue
        common.save_json(path, results[name])
    md = table(results)
    common.atomic_write(os.path.join(args.out, "table.md"), lambda f: f.write(md + "\n"))
    print(md)


if __name__ == "__main__":
    common.cli(main, parse_args())
