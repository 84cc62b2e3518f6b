"""How long benchmark/tiny_table.sh takes, estimated from the wall times of runs already made (not a measurement).

    DRY_RUN=1 bash benchmark/tiny_table.sh | python benchmark/estimate_time.py \\
        --measured runs/bench/*/*__s* runs/rlc_c1=rl_critic runs/rlc_none=rl_critic-nocritic

Reads the jobs tiny_table.sh would run (lib.sh's DRY_RUN lines: "run SCRIPT VARIANT CONCEPT SEED FOLDER" = training +
eval.py, "once KIND OUTPUT" = a base-model evaluation or SFD's base generator; repeated jobs counted once) and gives
each job a time from measured run folders (`--measured FOLDER` or `FOLDER=VARIANT` for folders not named
{variant}__{concept}__s{seed}):
- training: the run's own summary.json wall_seconds when the job's folder is measured, else the mean over measured
  runs of the same variant, else of the same script;
- eval.py: metrics.json "seconds" (generation + scoring) when recorded, else the time from summary.json to
  metrics.json, used only when eval.py started right after training (first image written within 60 s of summary.json,
  as lib.sh runs them); per job the median over measured runs of the same script (one-step SFD images are far quicker
  to make than the others' 25-step ones). A base-model evaluation counts as one eval.py of the multi-step methods (an
  upper bound: the second and third forget class reuse the images); SFD's base generator counts its own summary.json.
Prints per variant the jobs and times, the total for one lane and for two lanes (two copies of the script, each job
taken by the first lane free, in the script's order). The measured runs ran on a shared 2-core machine, mostly two or
more jobs at once, one thread each, so their times are what a lane takes next to another job.
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

NAME = re.compile(r"^(?P<variant>.+)__(?P<concept>[^_].*?)__s(?P<seed>\d+)$")
MULTI_STEP = ("fdiv", "pure", "rl_critic")  # scripts whose runs are evaluated from 25-step DDIM images


def load(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def measured_eval_seconds(run: str) -> float | None:
    """eval.py's time on a run folder: recorded by eval.py, or inferred from file times when eval followed training."""
    metrics = load(os.path.join(run, "metrics.json"))
    if metrics is None:
        return None
    sec = metrics.get("seconds")
    if isinstance(sec, dict) and "generate" in sec and "score" in sec:
        return sec["generate"] + sec["score"]
    summary, images = os.path.join(run, "summary.json"), glob.glob(os.path.join(run, "images", "*.png"))
    if not os.path.isfile(summary) or not images:
        return None
    t_summary, t_metrics = os.path.getmtime(summary), os.path.getmtime(os.path.join(run, "metrics.json"))
    if not 0 <= min(os.path.getmtime(p) for p in images) - t_summary <= 60:  # eval.py did not start right after
        return None
    return t_metrics - t_summary


def read_measured(specs: list[str]) -> list[dict]:
    out = []
    for spec in specs:
        folder, _, variant = spec.partition("=")
        folder = folder.rstrip("/")
        summary = load(os.path.join(folder, "summary.json"))
        if summary is None:
            continue  # not a finished run (or not a run folder): nothing measured
        m = NAME.match(os.path.basename(folder))
        if not variant and not m:
            name = "{variant}__{concept}__s{seed}"
            raise SystemExit(f"error: {folder!r} is not named {name}; pass {folder}=VARIANT")
        info = load(os.path.join(folder, "args.json")) or {}
        out.append(
            dict(
                folder=os.path.normpath(folder),
                variant=variant or m["variant"],
                script=info.get("method", "?"),
                train=summary.get("wall_seconds"),
                eval=measured_eval_seconds(folder),
            )
        )
    return out


def read_jobs(lines: list[str]) -> list[dict]:
    """The DRY_RUN lines as jobs, in order, each job once."""
    jobs, seen = [], set()
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "run" and len(parts) == 6:
            job = dict(kind="run", script=parts[1].removesuffix(".py"), variant=parts[2], folder=parts[5])
            key = ("run", os.path.normpath(parts[5]))
        elif parts[0] == "once" and len(parts) == 3:
            job = dict(kind=parts[1], output=parts[2], variant=parts[1])
            key = ("once", os.path.normpath(parts[2]))
        else:
            raise SystemExit(f"error: line {n} is not a DRY_RUN line of benchmark/lib.sh: {line.strip()!r}")
        if key not in seen:
            seen.add(key)
            jobs.append(job)
    if not jobs:
        raise SystemExit("error: no jobs on stdin (pipe `DRY_RUN=1 bash benchmark/tiny_table.sh` into this script)")
    return jobs


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def job_seconds(job: dict, measured: list[dict]) -> tuple[float, float, str]:
    """(training seconds, eval seconds, where the training figure came from) for one job."""
    if job["kind"] == "run":
        own = [m for m in measured if m["folder"] == os.path.normpath(job["folder"])]
        same_variant = [m for m in measured if m["variant"] == job["variant"] and m["script"] == job["script"]]
        same_script = [m for m in measured if m["script"] == job["script"]]
        pools = (("own run", own), ("same variant", same_variant), ("same script", same_script))
        source, train = next(((s, mean(m["train"] for m in pool)) for s, pool in pools if pool), (None, None))
        if train is None:
            raise SystemExit(f"error: nothing measured for {job['script']}.py ({job['folder']}); add --measured runs")
        ev = median(m["eval"] for m in same_script)
        if ev is None:
            raise SystemExit(f"error: no measured eval.py time for {job['script']}.py runs")
        return train, ev, source
    if job["kind"] == "sfd-base-generator":
        summary = load(job["output"])
        if summary is None:
            raise SystemExit(f"error: {job['output']} (SFD's base generator) has not been measured")
        return summary["wall_seconds"], 0.0, "own run"
    scripts = ("sfd",) if job["kind"] == "sfd-base-eval" else MULTI_STEP
    ev = median(m["eval"] for m in measured if m["script"] in scripts)
    if ev is None:
        raise SystemExit(f"error: no measured eval.py time for {', '.join(scripts)} runs")
    return 0.0, ev, "eval.py only"


def lanes_makespan(durations: list[float], lanes: int) -> float:
    """Wall time of `lanes` copies walking the same job list, each taking the next job nobody has taken."""
    free = [0.0] * lanes
    for d in durations:
        i = int(np.argmin(free))
        free[i] += d
    return max(free)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measured", nargs="+", default=sorted(glob.glob("runs/bench/*/*__s*")), help="measured runs")
    args = p.parse_args(argv)
    measured = read_measured(args.measured)
    if not measured:
        p.exit(2, "error: no measured run folders (with summary.json) among --measured\n")
    jobs = read_jobs(sys.stdin.read().splitlines())
    rows, durations = {}, []
    for job in jobs:
        train, ev, source = job_seconds(job, measured)
        durations.append(train + ev)
        r = rows.setdefault(job["variant"], dict(jobs=0, train=0.0, eval=0.0, sources=set()))
        r["jobs"] += 1
        r["train"] += train
        r["eval"] += ev
        r["sources"].add(source)
    print("| jobs of | count | training (s) | eval.py (s) | training figures from |")
    print("|---|---|---|---|---|")
    for variant, r in rows.items():
        print(f"| {variant} | {r['jobs']} | {r['train']:.0f} | {r['eval']:.0f} | {', '.join(sorted(r['sources']))} |")
    total = sum(durations)
    print(
        f"\nESTIMATE from {len(measured)} measured runs: {len(jobs)} jobs, {total / 3600:.1f} hours in one lane, "
        f"{lanes_makespan(durations, 2) / 3600:.1f} hours in two lanes (one core each)"
    )


if __name__ == "__main__":
    main()
