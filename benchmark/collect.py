"""Collect run folders' metrics.json (eval.py) and summary.json (the method scripts) into a markdown table.

    python benchmark/collect.py runs/bench/pure --base runs/bench/base

Run folders are named `{variant}__{concept}__s{seed}` (the benchmark scripts' `--out_dir`); rows group the seeds of a
(variant, concept) and show mean +- std (sample std over seeds; one seed: the value alone). `--base FOLDER` adds the
base model's numbers per concept from FOLDER/{concept}.json (`eval.py tiny --forget_class C --output ...`) and
the ratios FID/base and KID/base, and marks each row against the acceptance bars of the issues: UA >= --ua_bar,
RA >= base RA - 0.05, FID and KID <= 1.5 x base.
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


def collect(folder: str) -> dict:
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
            )
        )
    return groups


def table(groups: dict, base_dir: str | None, ua_bar: float) -> str:
    lines = [
        "| method | concept | seeds | UA | RA | FID | KID | FID / base | KID / base | wall time (s) "
        "| step / UNet passes | peak memory (MB) | bars |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seen_base = set()
    for (variant, concept), runs in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = load(os.path.join(base_dir, f"{concept.replace(' ', '_')}.json")) if base_dir else None
        b = base["summary"] if base else {}
        if base and concept not in seen_base:
            seen_base.add(concept)
            lines.append(
                f"| base model | {concept} | - | {fmt([b.get('UA')])} | {fmt([b.get('RA')])} "
                f"| {fmt([b.get('FID')], 2)} | {fmt([b.get('KID')], 4)} | 1 | 1 | - | - | - | - |"
            )
        col = {k: [r[k] for r in runs] for k in runs[0]}
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="folders holding run folders named {variant}__{concept}__s{seed}")
    p.add_argument("--base", default=None, help="folder with the base model's metrics per concept ({concept}.json)")
    p.add_argument("--ua_bar", type=float, default=0.95, help="UA the acceptance bar asks for")
    args = p.parse_args(argv)
    groups = {}
    for folder in args.folders:
        if not os.path.isdir(folder):
            p.exit(2, f"error: {folder!r} is not a folder\n")
        groups.update(collect(folder))
    if not groups:
        p.exit(
            2,
            f"error: no evaluated run folders ({{variant}}__{{concept}}__s{{seed}} with metrics.json) in "
            f"{args.folders}\n",
        )
    print(table(groups, args.base, args.ua_bar))


if __name__ == "__main__":
    sys.exit(main())
