"""benchmark/: collect.py's tables (mean +- std over seeds, ratios to base, bars, per run, step efficiency),
tiny_table.sh's grid, eval.py's recorded time."""

import json
import os
import subprocess
import sys

import pytest
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


def test_one_base_per_folder_and_runs_of_one_variant_from_two_folders(tmp_path, capsys):
    base_a, base_b = tmp_path / "base_a", tmp_path / "base_b"
    write(base_a / "church.json", dict(summary=dict(UA=0.0, RA=0.95, FID=10.0, KID=0.01)))
    write(base_b / "church.json", dict(summary=dict(UA=0.1, RA=0.85, FID=20.0, KID=0.02)))
    a, b = tmp_path / "a", tmp_path / "b"
    write(a / "esd__church__s0" / "metrics.json", dict(summary=dict(UA=1.0, RA=0.95, FID=10.0, KID=0.01)))
    write(b / "sfd__church__s0" / "metrics.json", dict(summary=dict(UA=1.0, RA=0.85, FID=30.0, KID=0.02)))
    collect.main([str(a), str(b), "--base", str(base_a), str(base_b)])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert sum(r.startswith("| base model | church |") for r in rows) == 2  # one base row per base folder
    esd, sfd = next(r for r in rows if r.startswith("| esd")), next(r for r in rows if r.startswith("| sfd"))
    assert "| 1.00 | 1.00 |" in esd and esd.endswith("| met |")
    assert "| 1.50 | 1.00 |" in sfd and sfd.endswith("| met |")  # FID 30 vs its own base 20, not vs 10
    with pytest.raises(SystemExit):  # 3 bases for 2 folders
        collect.main([str(a), str(b), "--base", str(base_a), str(base_b), str(base_a)])
    write(b / "esd__church__s0" / "metrics.json", dict(summary=dict(UA=1.0, RA=0.95, FID=10.0, KID=0.01)))
    with pytest.raises(SystemExit):  # the same run (variant, concept, seed) in two folders
        collect.main([str(a), str(b)])
    assert "two folders" in capsys.readouterr().err


def test_per_run_rows_show_each_runs_times_and_eval_seconds(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, sec in [(0, dict(generate=30.0, score=12.0, definition="...")), (1, None)]:
        m = dict(summary=dict(UA=1.0, RA=0.9, FID=11.0, KID=0.01))
        if sec:
            m["seconds"] = sec
        write(runs / f"fdiv-mse__parachute__s{seed}" / "metrics.json", m)
        write(runs / f"fdiv-mse__parachute__s{seed}" / "summary.json", dict(wall_seconds=60.0 + seed, peak_memory_mb=9))
    collect.main([str(runs), "--per_run"])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows[0].startswith("| fdiv-mse | parachute | 0 |") and "| 60 | 42 |" in rows[0]
    assert rows[1].startswith("| fdiv-mse | parachute | 1 |") and "| 61 | - |" in rows[1]


def test_efficiency_table_flags_steps_above_the_bar_and_missing_ratios(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, eff in [("pure__church__s0", 1.0), ("pure__church__s1", 1.2), ("rl_critic__church__s0", 1.31)]:
        write(runs / name / "summary.json", dict(step_efficiency=eff))
        write(runs / name / "args.json", dict(method=name.split("__")[0]))
    write(runs / "generator" / "summary.json", dict(wall_seconds=3.0))  # no ratio (0 steps), any folder name
    write(runs / "generator" / "args.json", dict(method="sfd"))
    write(runs / "untrained__church__s0" / "args.json", dict(method="pure"))  # no summary.json: not a finished run
    collect.main([str(runs), "--efficiency"])
    rows = {r.split(" | ")[1]: r for r in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"pure", "rl_critic", "generator"}
    assert rows["pure"] == "| pure.py | pure | 2 | 1.10 +- 0.14 | 1.00 | 1.20 | no |"
    assert rows["rl_critic"].endswith("| 1.31 | 1.31 | **1 of 1** |")
    assert rows["generator"].endswith("| n/a | n/a | no; 1 without the ratio |")


# ---------------------------------------------------------------- the whole table


def dry_run_jobs(script: str) -> list[list[str]]:
    """The jobs a benchmark script would run, from lib.sh's DRY_RUN lines: ["run", SCRIPT, VARIANT, CONCEPT, SEED,
    FOLDER] (train + eval.py) or ["once", KIND, OUTPUT] (a base-model evaluation, SFD's base generator)."""
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmark", script)],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = [line.split() for line in out.splitlines()]
    assert jobs and all(j[0] in ("run", "once") and len(j) == (6 if j[0] == "run" else 3) for j in jobs), out
    return jobs


def test_tiny_table_covers_every_method_x_3_classes_x_3_seeds():
    jobs = dry_run_jobs("tiny_table.sh")
    grid = {}
    for j in jobs:
        if j[0] == "run":
            variant, concept, seed = os.path.basename(j[5]).split("__")
            assert (variant, concept, seed) == (j[2], j[3], f"s{j[4]}")
            grid.setdefault(variant, set()).add((concept, seed))
    full = {(c, f"s{s}") for c in ("church", "garbage_truck", "parachute") for s in range(3)}
    for variant in ("esd", "esd_official", "fdiv-hellinger", "pure", "sfd", "rl_critic"):
        assert grid[variant] == full, variant
    for variant in ("fdiv-mse", "fdiv-pearson_chi2", "pure-ga", "pure-norepair", "pure-nokl"):
        assert ("church", "s0") in grid[variant], variant
    assert {s for c, s in grid["pure-ga"]} == {"s0", "s1", "s2"}  # PURE's ablations on 3 seeds
    for div in ("mse", "hellinger", "pearson_chi2", "total_variation", "js-variational"):  # the divergence study
        assert all({c for c, _ in grid[f"{div}-{k}"]} == {c for c, _ in full} for k in (50, 100, 200)), div
    for rl in ("rl_critic-paper", "rl_critic-paper-nocritic", "rl_critic-paper-clean"):  # the paper and its ablations
        assert grid[rl] == full, rl
    once = [j[1] for j in jobs if j[0] == "once"]
    assert len(set(j[2] for j in jobs if j[0] == "once" and j[1] == "base-eval")) == 3
    assert once.count("sfd-base-eval") == 3 and "sfd-base-generator" in once
    assert "robustness-base" in once  # then the attack on every trained run (benchmark/robustness.sh)


def test_eval_records_its_own_generation_and_scoring_time(tmp_path):
    import eval as evaluate
    from data import pictonette

    folder = tmp_path / "real"
    pictonette.write_folder(str(folder), 1, 1000)
    evaluate.main(evaluate.parse_args([str(folder), "--metrics", "ua", "--device", "cpu"]))
    sec = json.load(open(folder / "metrics.json"))["seconds"]
    assert sec["generate"] < 1 and sec["score"] > 0  # an image folder: nothing generated


def test_robustness_table_has_clean_ua_asr_and_relearned_ua_per_step(tmp_path, capsys):
    runs, base = tmp_path / "runs", tmp_path / "base"
    write(base / "church.json", dict(summary=dict(UA=0.02), attack=dict(ASR=0.8), relearn=dict(steps=[5], UA=[0.0])))
    for seed, (ua, asr, relearned) in enumerate([(1.0, 0.2, [0.9, 0.1]), (0.98, 0.4, [0.7, 0.0])]):
        write(
            runs / f"esd__church__s{seed}" / "robustness.json",
            dict(summary=dict(UA=ua), attack=dict(ASR=asr), relearn=dict(steps=[5, 50], UA=relearned)),
        )
    write(runs / "pure__church__s0" / "metrics.json", dict(summary=dict(UA=1.0)))  # not attacked: left out
    collect.main([str(runs), "--robustness", "--base", str(base)])
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("| UA after relearning 5 steps | UA after relearning 50 steps |")
    assert out[2] == "| base model | church | - | 0.020 | 0.800 | 0.000 | n/a |"
    assert out[3] == "| esd | church | 2 | 0.990 +- 0.014 | 0.300 +- 0.141 | 0.800 +- 0.141 | 0.050 +- 0.071 |"
    assert len(out) == 4
