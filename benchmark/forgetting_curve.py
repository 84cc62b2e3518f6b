"""Critic vs no critic at equal rollouts: the reward model's p(concept) on the forget rollouts against the number of
rollouts, per variant, from the finished run folders' metrics.jsonl (rl_critic.py logs it every iteration).

    python benchmark/forgetting_curve.py runs/bench/rl_critic --concept church
    python benchmark/forgetting_curve.py runs/bench/rl_critic --concept church --at 160 320 640 1280 --below 0.1

Run folders are named `{variant}__{concept}__s{seed}` (benchmark/rl_critic.sh). For each variant (e.g. rl_critic and
rl_critic-nocritic) and each rollout count in --at: the mean of p(concept) over the --window iterations ending there,
then mean +- std over seeds; and the rollouts until p(concept) first falls below --below (window mean), per seed.
p(concept) is the training reward model's (never the evaluation judge's): it says how fast the policy optimises its
reward, eval.py says whether the judge agrees.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np
from collect import NAME  # run folders {variant}__{concept}__s{seed}


def curves(folder: str, concept: str) -> dict:
    """{variant: {seed: (rollouts (N,), p_concept (N,))}} for the runs of `concept` in `folder`."""
    out = {}
    for run in sorted(glob.glob(os.path.join(folder, f"*__{concept.replace(' ', '_')}__s*"))):
        m = NAME.match(os.path.basename(run))
        path = os.path.join(run, "metrics.jsonl")
        if not m or not os.path.isfile(path) or not os.path.isfile(os.path.join(run, "summary.json")):
            continue  # not a run folder, or still training (summary.json is written at the end)
        rows = [json.loads(line) for line in open(path) if line.strip()]
        rows = [r for r in rows if "p_concept_forget" in r and "rollouts" in r]
        if rows:
            rollouts = np.array([r["rollouts"] for r in rows])
            p = np.array([r["p_concept_forget"] for r in rows])
            out.setdefault(m["variant"], {})[int(m["seed"])] = (rollouts, p)
    return out


def window_mean(rollouts: np.ndarray, p: np.ndarray, at: int, window: int) -> float | None:
    """Mean of p over the `window` logged iterations ending at the last one with rollouts <= at."""
    idx = np.nonzero(rollouts <= at)[0]
    if len(idx) == 0 or rollouts[idx[-1]] != at:
        return None  # the run did not log this count (shorter run, or another batch size)
    end = idx[-1] + 1
    return float(p[max(0, end - window) : end].mean())


def first_below(rollouts: np.ndarray, p: np.ndarray, level: float, window: int) -> int | None:
    for end in range(1, len(p) + 1):
        if p[max(0, end - window) : end].mean() < level:
            return int(rollouts[end - 1])
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder holding rl_critic run folders named {variant}__{concept}__s{seed}")
    p.add_argument("--concept", required=True, help="the forgotten concept, e.g. church")
    p.add_argument("--at", type=int, nargs="+", default=[160, 320, 480, 640, 800, 960, 1280], help="rollout counts")
    p.add_argument("--window", type=int, default=5, help="iterations averaged at each count")
    p.add_argument("--below", type=float, default=0.1, help="report the rollouts until p(concept) < this")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error(f"--window must be >= 1 (got {args.window})")
    data = curves(args.folder, args.concept)
    if not data:
        sys.exit(
            f"forgetting_curve.py: no run folder of {args.concept!r} in {args.folder} that has finished "
            "(summary.json) and logged p_concept_forget (metrics.jsonl)"
        )
    lines = [
        "| variant | seeds | " + " | ".join(str(a) for a in args.at) + f" | rollouts until < {args.below} |",
        "|---" * (len(args.at) + 3) + "|",
    ]
    for variant, runs in sorted(data.items()):
        cells = []
        for a in args.at:
            vals = [v for v in (window_mean(r, q, a, args.window) for r, q in runs.values()) if v is not None]
            cells.append(
                "-"
                if not vals
                else f"{np.mean(vals):.2f}" + (f" +- {np.std(vals, ddof=1):.2f}" if len(vals) > 1 else "")
            )
        below = [first_below(r, q, args.below, args.window) for r, q in runs.values()]
        below_txt = ", ".join("not reached" if b is None else str(b) for b in below)
        seeds = ", ".join(str(s) for s in sorted(runs))
        lines.append(f"| {variant} | {seeds} | " + " | ".join(cells) + f" | {below_txt} |")
    head = f"p({args.concept}) on the forget rollouts (reward model; mean of {args.window} iterations)"
    print(head + ", mean +- std over seeds")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
