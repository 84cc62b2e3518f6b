"""benchmark/collect.py: run folders into the README's table (mean +- std over seeds, ratios to base, bars)."""

import json
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import collect  # noqa: E402


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_table_means_stds_ratios_and_bars(tmp_path, capsys):
    runs, base = tmp_path / "runs", tmp_path / "base"
    write(base / "garbage_truck.json", dict(summary=dict(UA=0.02, RA=0.96, FID=10.0, KID=0.010)))
    for seed, (ua, ra, fid) in enumerate([(1.0, 0.95, 12.0), (0.96, 0.93, 14.0), (0.98, 0.94, 13.0)]):
        run = runs / f"pure__garbage_truck__s{seed}"
        write(run / "metrics.json", dict(summary=dict(UA=ua, RA=ra, FID=fid, KID=0.012)))
        write(run / "summary.json", dict(wall_seconds=100.0 + seed, step_efficiency=1.1, peak_memory_mb=900.0))
    write(runs / "pure-ga__garbage_truck__s0" / "metrics.json", dict(summary=dict(UA=1.0, RA=0.5, FID=40.0, KID=0.1)))
    write(runs / "unevaluated__church__s0" / "summary.json", dict(wall_seconds=1.0))  # no metrics.json: left out
    collect.main([str(runs), "--base", str(base)])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in out[2:]}
    assert set(rows) == {"base model", "pure", "pure-ga"}
    assert "| pure | garbage truck | 3 | 0.980 +- 0.020 | 0.940 +- 0.010 | 13.00 +- 1.00 |" in rows["pure"]
    assert "| 1.30 +- 0.10 | 1.20 +- 0.00 | 101 +- 1 |" in rows["pure"] and rows["pure"].endswith("| met |")
    assert rows["pure-ga"].endswith("| **not met** |")  # RA 0.5 < 0.96 - 0.05, FID 4x base
    assert "| base model | garbage truck | - | 0.020 | 0.960 | 10.00 | 0.0100 |" in rows["base model"]
