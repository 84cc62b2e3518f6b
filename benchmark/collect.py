"""Collect run folders' metrics.json (eval.py) and summary.json (the method scripts) into markdown tables.

    python benchmark/collect.py runs/bench/pure --base runs/bench/base
    python benchmark/collect.py runs/bench/fdiv runs/bench/sfd --base runs/bench/base runs/bench/sfd_base
    python benchmark/collect.py runs/bench/fdiv --per_run          # one row per run: times and memory of each
    python benchmark/collect.py runs/bench/* runs/rlc_c1 --efficiency   # step time / UNet-pass time per method
    python benchmark/collect.py runs/bench/esd --robustness --base runs/bench/robustness_base   # attack, relearning

Run folders are named `{variant}__{concept}__s{seed}` (the benchmark scripts' `--out_dir`); rows group the seeds of a
(variant, concept) and show mean +- std (sample std over seeds; one seed: the value alone). `--base FOLDER` adds the
base model's numbers per concept from FOLDER/{concept}.json (`eval.py tiny --forget_class C --output ...`) and
the ratios FID/base and KID/base, and marks each row against the project's bars (docs/results.md): UA >= --ua_bar,
RA >= base RA - 0.05, FID and KID <= 1.5 x base. One --base serves every folder, or give one per folder (SFD's
base is its distilled generator, runs/bench/sfd_base). Wall time and peak memory are the method script's
summary.json (training only); `--per_run` adds eval.py's own time (metrics.json "seconds", written since this
benchmark existed; older runs show "-").

`--efficiency` needs only summary.json: per variant, the time of a training step over the time of the UNet passes that
step needs, measured by the method script in the same process (1.0 = no overhead; the bar: at most 1.3). A
FOLDER may also be a single run folder with any name (then its variant is the folder name).

`--robustness` reads each run's robustness.json (`eval.py RUN --metrics ua --attack soft_prompt --relearn N...
--output RUN/robustness.json`, benchmark/robustness.sh): clean UA, the attack's ASR and the UA after each relearning
step count, mean +- std over seeds; `--base` then holds the base model's robustness.json per concept.
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np

NAME = re.compile(r"^(?P<variant>.+)__(?P<concept>[^_].*?)__s(?P<seed>\d+)$")


def load(path: str) -> dict | None:
    return json.load(open(path)) if os.path.isfile(path) else None


def fmt(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} +- {np.std(values, ddof=1):.{digits}f}"


def eval_seconds(metrics: dict) -> float | None:
    """eval.py's own wall time for a run (generation + scoring), when its metrics.json records it."""
    sec = metrics.get("seconds")
    return sec["generate"] + sec["score"] if isinstance(sec, dict) and "generate" in sec and "score" in sec else None


def collect(folder: str, base: str | None = None) -> dict:
    """{(variant, concept): [run, ...]} for the evaluated run folders in `folder`; each run remembers `base`."""
    groups = {}
    for run in sorted(glob.glob(os.path.join(folder, "*__s*"))):
        m = NAME.match(os.path.basename(run))
        metrics, summary = load(os.path.join(run, "metrics.json")), load(os.path.join(run, "summary.json"))
        if not m or metrics is None:
            continue
        s = metrics["summary"]
        groups.setdefault((m["variant"], m["concept"].replace("_", " ")), []).append(
            dict(
                seed=int(m["seed"]),
                UA=s.get("UA"),
                RA=s.get("RA"),
                FID=s.get("FID"),
                KID=s.get("KID"),
                wall=(summary or {}).get("wall_seconds"),
                eff=(summary or {}).get("step_efficiency"),
                mem=(summary or {}).get("peak_memory_mb"),
                eval_seconds=eval_seconds(metrics),
                base=base,
            )
        )
    return groups


def table(groups: dict, base_dir: str | None, ua_bar: float) -> str:
    """The results table: one row per (variant, concept), base-model rows first per concept. A run's own `base`
    (collect's argument) wins over `base_dir`."""
    lines = [
        "| method | concept | seeds | UA | RA | FID | KID | FID / base | KID / base | wall time (s) "
        "| step / UNet passes | peak memory (MB) | bars |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen_base = set()
    for (variant, concept), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        folder = runs[0].get("base") or base_dir
        base = load(os.path.join(folder, f"{concept.replace(' ', '_')}.json")) if folder else None
        b = base["summary"] if base else {}
        if base and (folder, concept) not in seen_base:
            seen_base.add((folder, concept))
            lines.append(
                f"| base model | {concept} | - | {fmt([b.get('UA')])} | {fmt([b.get('RA')])} "
                f"| {fmt([b.get('FID')], 2)} | {fmt([b.get('KID')], 4)} | 1 | 1 | - | - | - | - |"
            )
        col = {k: [r[k] for r in runs] for k in runs[0] if k != "base"}
        ratio_fid = [f / b["FID"] for f in col["FID"] if f is not None] if b.get("FID") else []
        ratio_kid = [k / b["KID"] for k in col["KID"] if k is not None] if b.get("KID") and b["KID"] > 0 else []
        bars = "-"
        if b:
            ok = (
                np.mean(col["UA"]) >= ua_bar
                and np.mean(col["RA"]) >= b["RA"] - 0.05
                and (not ratio_fid or np.mean(ratio_fid) <= 1.5)
                and (not ratio_kid or np.mean(ratio_kid) <= 1.5)
            )
            bars = "met" if ok else "**not met**"
        lines.append(
            f"| {variant} | {concept} | {len(runs)} | {fmt(col['UA'])} | {fmt(col['RA'])} | {fmt(col['FID'], 2)} | "
            f"{fmt(col['KID'], 4)} | {fmt(ratio_fid, 2)} | {fmt(ratio_kid, 2)} | {fmt(col['wall'], 0)} | "
            f"{fmt(col['eff'], 2)} | {fmt(col['mem'], 0)} | {bars} |"
        )
    return "\n".join(lines)


def per_run_table(groups: dict) -> str:
    """One row per run: its metrics, training wall time, eval.py time, step efficiency and peak memory."""
    lines = [
        "| method | concept | seed | UA | RA | FID | KID | training wall time (s) | eval.py time (s) "
        "| step / UNet passes | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, concept), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for r in sorted(runs, key=lambda r: r["seed"]):
            lines.append(
                f"| {variant} | {concept} | {r['seed']} | {fmt([r['UA']])} | {fmt([r['RA']])} | {fmt([r['FID']], 2)} | "
                f"{fmt([r['KID']], 4)} | {fmt([r['wall']], 0)} | {fmt([r['eval_seconds']], 0).replace('n/a', '-')} | "
                f"{fmt([r['eff']], 2)} | {fmt([r['mem']], 0)} |"
            )
    return "\n".join(lines)


def efficiency_runs(path: str) -> list[dict]:
    """Runs with a summary.json under `path` (a folder of run folders, or one run folder): variant, method, ratio."""
    candidates = [path] if os.path.isfile(os.path.join(path, "summary.json")) else sorted(glob.glob(f"{path}/*/"))
    out = []
    for run in candidates:
        run = run.rstrip("/")
        summary = load(os.path.join(run, "summary.json"))
        if summary is None:
            continue
        info = load(os.path.join(run, "args.json")) or {}
        m = NAME.match(os.path.basename(run))
        out.append(
            dict(
                run=run,
                variant=m["variant"] if m else os.path.basename(run),
                method=info.get("method", "?"),
                eff=summary.get("step_efficiency"),
            )
        )
    return out


def efficiency_table(runs: list[dict], bar: float = 1.3) -> str:
    """Per (method script, variant): runs, step / UNet passes mean +- std, min, max, and whether any run is above
    `bar`; runs whose summary.json has no ratio are counted and listed as missing."""
    groups = {}
    for r in runs:
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    lines = [
        f"| script | variant | runs | step / UNet passes | min | max | above {bar}x |",
        "|---|---|---|---|---|---|---|",
    ]
    for (method, variant), rs in sorted(groups.items()):
        values = [r["eff"] for r in rs if r["eff"] is not None]
        missing = len(rs) - len(values)
        above = [r for r in rs if r["eff"] is not None and r["eff"] > bar]
        flag = f"**{len(above)} of {len(values)}**" if above else "no"
        if missing:
            flag += f"; {missing} without the ratio"
        lo, hi = (f"{min(values):.2f}", f"{max(values):.2f}") if values else ("n/a", "n/a")
        lines.append(f"| {method}.py | {variant} | {len(rs)} | {fmt(values, 2)} | {lo} | {hi} | {flag} |")
    return "\n".join(lines)


def robustness_table(folders: list, base_dir: str | None) -> str:
    """Per (variant, concept): clean UA, ASR under --attack soft_prompt, UA after each --relearn step count."""
    groups = {}
    for folder in folders:
        for run in sorted(glob.glob(os.path.join(folder, "*__s*"))):
            m, r = NAME.match(os.path.basename(run)), load(os.path.join(run, "robustness.json"))
            if m and r is not None:
                groups.setdefault((m["variant"], m["concept"].replace("_", " ")), []).append(r)
    steps = sorted({s for rs in groups.values() for r in rs for s in r.get("relearn", {}).get("steps", [])})
    relearned = lambda r, s: r["relearn"]["UA"][r["relearn"]["steps"].index(s)] if s in r.get("relearn", {}).get(
        "steps", []) else None  # fmt: skip
    row = lambda name, concept, seeds, rs: (
        f"| {name} | {concept} | {seeds} | {fmt([r['summary']['UA'] for r in rs])} | "
        f"{fmt([r.get('attack', {}).get('ASR') for r in rs])} | "
        + " | ".join(fmt([relearned(r, s) for r in rs]) for s in steps)
        + " |"
    )
    lines = [
        "| method | concept | seeds | UA (clean) | ASR (soft prompt) | "
        + " | ".join(f"UA after relearning {s} steps" for s in steps)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(steps),
    ]
    seen = set()
    for (variant, concept), rs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = load(os.path.join(base_dir, f"{concept.replace(' ', '_')}.json")) if base_dir else None
        if base and concept not in seen:
            seen.add(concept)
            lines.append(row("base model", concept, "-", [base]))
        lines.append(row(variant, concept, len(rs), rs))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="folders holding run folders named {variant}__{concept}__s{seed}")
    p.add_argument(
        "--base",
        nargs="+",
        default=None,
        help="folder(s) with the base model's metrics per concept ({concept}.json): one for every folder, or one per "
        "folder in the same order",
    )
    p.add_argument("--ua_bar", type=float, default=0.95, help="UA the acceptance bar asks for")
    p.add_argument("--per_run", action="store_true", help="one row per run instead of mean +- std per variant")
    p.add_argument("--efficiency", action="store_true", help="step time / UNet-pass time per variant (summary.json)")
    p.add_argument("--bar", type=float, default=1.3, help="--efficiency: flag ratios above this")
    p.add_argument("--robustness", action="store_true", help="attack ASR and relearned UA (robustness.json)")
    args = p.parse_args(argv)
    for folder in args.folders:
        if not os.path.isdir(folder):
            p.exit(2, f"error: {folder!r} is not a folder\n")
    if args.efficiency:
        runs = [r for folder in args.folders for r in efficiency_runs(folder)]
        if not runs:
            p.exit(2, f"error: no run folders with summary.json in {args.folders}\n")
        print(efficiency_table(runs, args.bar))
        return
    if args.robustness:
        print(robustness_table(args.folders, (args.base or [None])[0]))
        return
    bases = args.base or [None]
    if len(bases) not in (1, len(args.folders)):
        p.exit(2, f"error: --base takes one folder or one per folder ({len(args.folders)}), got {len(bases)}\n")
    for b in bases:
        if b is not None and not os.path.isdir(b):
            p.exit(2, f"error: --base {b!r} is not a folder\n")
    groups = {}
    for i, folder in enumerate(args.folders):
        for key, runs in collect(folder, bases[i if len(bases) > 1 else 0]).items():
            seen = {r["seed"] for r in groups.get(key, [])}
            if seen & {r["seed"] for r in runs}:
                twice = f"{key[0]}__{key[1]} seeds {sorted(seen)}"
                p.exit(2, f"error: runs {twice} are in two folders; collect them apart\n")
            groups.setdefault(key, []).extend(runs)
    if not groups:
        p.exit(
            2,
            f"error: no evaluated run folders ({{variant}}__{{concept}}__s{{seed}} with metrics.json) in "
            f"{args.folders}\n",
        )
    print(per_run_table(groups) if args.per_run else table(groups, None, args.ua_bar))


if __name__ == "__main__":
    sys.exit(main())
