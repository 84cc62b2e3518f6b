"""UA and RA against training steps per f-divergence (benchmark/fdiv_divergences.sh's run folders): one table and one
figure, FOLDER/divergences.md and FOLDER/divergences.png (matplotlib, needed by this figure only).

    python benchmark/divergence_figure.py runs/bench/fdiv_divergences --base runs/bench/base

Run folders are named `{divergence}-{steps}__{concept}__s{seed}`; each point is one run's eval.py metrics.json, the
step-0 point the base model's (BASE/{concept}.json).
"""

import argparse
import glob
import json
import os
import re
import sys

NAME = re.compile(r"^(?P<div>.+)-(?P<steps>\d+)__(?P<concept>.+)__s(?P<seed>\d+)$")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--base", default="runs/bench/base", help="folder of the base model's {concept}.json")
    args = p.parse_args(argv)
    points = {}  # (divergence, concept) -> {steps: (UA, RA)}
    for run in sorted(glob.glob(os.path.join(args.folder, "*__s*"))):
        m, path = NAME.match(os.path.basename(run)), os.path.join(run, "metrics.json")
        if m and os.path.isfile(path):
            s = json.load(open(path))["summary"]
            points.setdefault((m["div"], m["concept"]), {})[int(m["steps"])] = (s["UA"], s["RA"])
    if not points:
        sys.exit(f"error: no evaluated '{{divergence}}-{{steps}}__{{concept}}__s0' run folders in {args.folder!r}")
    for (_, concept), curve in points.items():
        base = os.path.join(args.base, f"{concept}.json")
        if os.path.isfile(base):
            s = json.load(open(base))["summary"]
            curve.setdefault(0, (s["UA"], s["RA"]))
    divs = list(dict.fromkeys(d for d, _ in points))
    concepts = list(dict.fromkeys(c for _, c in points))
    steps = sorted({k for curve in points.values() for k in curve})

    rows = ["| divergence | class | " + " | ".join(f"{k} steps UA / RA" for k in steps) + " |"]
    rows.append("|---|---|" + "---|" * len(steps))
    for d in divs:
        for c in concepts:
            curve = points.get((d, c), {})
            cells = [f"{curve[k][0]:.2f} / {curve[k][1]:.3f}" if k in curve else "-" for k in steps]
            rows.append(f"| {d} | {c.replace('_', ' ')} | " + " | ".join(cells) + " |")
    table = "\n".join(rows) + "\n"
    open(os.path.join(args.folder, "divergences.md"), "w").write(table)
    print(table)

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: the figure needs matplotlib (pip install matplotlib); the table is written")
    fig, axes = plt.subplots(2, len(concepts), figsize=(4 * len(concepts), 6), sharex=True, squeeze=False)
    for j, c in enumerate(concepts):
        for d in divs:
            curve = points.get((d, c), {})
            ks = sorted(curve)
            for i in range(2):
                axes[i][j].plot(ks, [curve[k][i] for k in ks], marker="o", label=d)
        axes[0][j].set_title(c.replace("_", " "))
        axes[1][j].set_xlabel("training steps")
    axes[0][0].set_ylabel("UA (forgetting)")
    axes[1][0].set_ylabel("RA (other classes)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.folder, "divergences.png"), dpi=100)
    print(f"wrote {os.path.join(args.folder, 'divergences.png')} and divergences.md")


if __name__ == "__main__":
    main()
