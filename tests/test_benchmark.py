"""benchmark/: collect.py's tables (mean +- std over seeds, ratios to base, bars, per run, step efficiency),
time_to_forget.py's bookkeeping, tiny_table.sh's grid and estimate_time.py, eval.py's recorded time."""

import json
import os
import subprocess
import sys
import time

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


# ---------------------------------------------------------------- time to forget

import time_to_forget as ttf  # noqa: E402

FAKE_METHOD = """
import argparse
import os

import torch

import common


def parse_args(argv):
    p = argparse.ArgumentParser()
    for flag in ["--concept", "--out_dir"]:
        p.add_argument(flag)
    for flag in ["--seed", "--sample_every", "--save_every", "--log_every"]:
        p.add_argument(flag, type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    return p.parse_args(argv)


def main(args):
    os.makedirs(args.out_dir)
    unet = torch.nn.Linear(1, 1)
    for step in range(args.steps):
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            common.log_metrics(args.out_dir, done, dict(sec_per_step=0.5))
        if done % args.save_every == 0 and done < args.steps:
            common.save_unet(unet, os.path.join(args.out_dir, "unet"))
            common.save_checkpoint(args.out_dir, done, {}, {})
    common.save_unet(unet, os.path.join(args.out_dir, "unet"))
    common.save_checkpoint(args.out_dir, args.steps, {}, {})
"""


def fake_judge(concept_accuracies: list, seconds: float):
    """common.tiny_judge_accuracies stand-in: the concept's accuracy from the list in turn (float32 like the judge's),
    0.9 for other classes; each call takes `seconds`."""
    import torch

    def judge(model, unets, classes, n, t_init=None):
        time.sleep(seconds)
        if len(classes) == 1:
            return [{classes[0]: float(torch.tensor(concept_accuracies.pop(0), dtype=torch.float32))}]
        return [dict.fromkeys(classes, 0.9)]

    return judge


def ttf_args(tmp_path, **kw):
    return ttf.parse_args(["--concept", "church", "--out", str(tmp_path / "out"), *kw.get("argv", [])])


def test_time_to_forget_stops_at_the_first_checkpoint_at_the_bar_and_excludes_judging(tmp_path, monkeypatch):
    (tmp_path / "fake_method.py").write_text(FAKE_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ttf.METHODS, "fake", ("fake_method", [], 2, "steps"))
    # accuracy 0.05 = 1 in 20 images: UA exactly 0.95 although the float32 mean gives 0.94999999...
    monkeypatch.setattr(ttf.common, "tiny_judge_accuracies", fake_judge([0.5, 0.05, 0.0], seconds=1.0))
    saved = ttf.common.save_unet
    start = time.perf_counter()
    r = ttf.run_method("fake", ttf_args(tmp_path), judge_model=None)
    elapsed = time.perf_counter() - start
    assert ttf.common.save_unet is saved  # restored
    assert [c["step"] for c in r["curve"]] == [2, 4] and r["reached"]["step"] == 4  # stopped there: step 6 not judged
    assert r["reached"]["UA"] == 0.95 and r["reached"]["RA"] == pytest.approx(0.9)
    assert r["reached"]["train_seconds"] == pytest.approx(4 * 0.5)  # the script's own per-step timers, 4 steps
    # Three 1 s judge calls: UA at step 2, UA and RA at step 4, all after the step-4 clock reading or subtracted
    # from it. So the reading is at most the whole call's time less 3 s, however slow the machine. Had the step-2
    # judge been counted, this would fail unless the run's clean-up after the stop took over a second.
    assert 0 < r["reached"]["wall_seconds"] <= elapsed - 3 * 1.0
    assert not os.path.exists(tmp_path / "out" / "fake__church__s0" / "unet")  # the judge replaced the saving


def test_time_to_forget_reports_a_bar_not_reached_and_ratios_to_esd(tmp_path, monkeypatch):
    (tmp_path / "fake_method.py").write_text(FAKE_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(ttf.METHODS, "fake", ("fake_method", [], 2, "steps"))
    monkeypatch.setattr(ttf.common, "tiny_judge_accuracies", fake_judge([0.9, 0.5, 0.3], seconds=0.0))
    never = ttf.run_method("fake", ttf_args(tmp_path), judge_model=None)
    assert never["reached"] is None and [c["step"] for c in never["curve"]] == [2, 4, 6]
    esd = dict(never, reached=dict(step=20, UA=1.0, RA=0.9, train_seconds=10.0, wall_seconds=20.0), unit="steps")
    fast = dict(never, reached=dict(step=10, UA=0.95, RA=0.8, train_seconds=5.0, wall_seconds=15.0), unit="steps")
    rows = ttf.table(dict(esd=esd, fast=fast, never=never)).splitlines()[2:]
    assert rows[1] == "| fast | 10 steps | 5 | 15 | 0.50 | 0.75 | 0.95 | 0.80 | 0.70 (step 6) |"
    assert rows[2] == "| never | not reached in 6 steps | - | - | - | - | - | - | 0.70 (step 6) |"


def test_loop_seconds_sums_the_logged_windows_and_needs_a_line_at_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps(dict(step=s, sec_per_step=t)) + "\n" for s, t in [(10, 0.5), (20, 1.0), (25, 2)])
    )
    assert ttf.loop_seconds(str(path), 20) == pytest.approx(10 * 0.5 + 10 * 1.0)
    assert ttf.loop_seconds(str(path), 25) == pytest.approx(15 + 5 * 2)
    with pytest.raises(ValueError, match="no line for step 15"):
        ttf.loop_seconds(str(path), 15)


def test_time_to_forget_rejects_bad_flags(capsys):
    for argv in (["--concept", "dragon"], ["--steps", "esd"], ["--steps", "nope=10"], ["--n_judge", "0"]):
        with pytest.raises(SystemExit):
            ttf.parse_args(argv)
    assert "error:" in capsys.readouterr().err


# ---------------------------------------------------------------- the whole table and its time estimate

import estimate_time  # noqa: E402


def test_tiny_table_covers_every_method_x_3_classes_x_3_seeds():
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "benchmark", "tiny_table.sh")],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    jobs = estimate_time.read_jobs(out.splitlines())
    grid = {}
    for j in jobs:
        if j["kind"] == "run":
            variant, concept, seed = os.path.basename(j["folder"]).split("__")
            grid.setdefault(variant, set()).add((concept, seed))
    full = {(c, f"s{s}") for c in ("church", "garbage_truck", "parachute") for s in range(3)}
    for variant in ("esd", "fdiv-hellinger", "fdiv-mse", "fdiv-pearson_chi2", "pure", "sfd", "rl_critic"):
        assert grid[variant] == full, variant
    assert sum(j["kind"] == "base-eval" for j in jobs) == 3 and sum(j["kind"] == "sfd-base-eval" for j in jobs) == 3


def test_estimate_counts_each_job_once_and_schedules_two_lanes(tmp_path):
    lines = [
        "once base-eval runs/bench/base/church.json",
        "run fdiv.py esd church 0 runs/bench/fdiv/esd__church__s0",
        "run fdiv.py esd church 0 runs/bench/fdiv/esd__church__s0",  # fdiv.sh lists some runs twice
        "once base-eval runs/bench/base/church.json",
    ]
    assert [j["kind"] for j in estimate_time.read_jobs(lines)] == ["base-eval", "run"]
    with pytest.raises(SystemExit):
        estimate_time.read_jobs(["python eval.py tiny"])
    assert estimate_time.lanes_makespan([4, 1, 1, 1, 1], 2) == 4
    assert estimate_time.lanes_makespan([1, 1, 4], 2) == 5  # the lanes take jobs in the script's order
    run = tmp_path / "esd__church__s1"
    write(run / "summary.json", dict(wall_seconds=80.0))
    write(run / "args.json", dict(method="fdiv"))
    write(run / "metrics.json", dict(summary={}, seconds=dict(generate=100.0, score=20.0)))
    measured = estimate_time.read_measured([str(run)])
    job = estimate_time.read_jobs(["run fdiv.py esd church 2 runs/bench/fdiv/esd__church__s2"])[0]
    assert estimate_time.job_seconds(job, measured) == (80.0, 120.0, "same variant")
    base = estimate_time.read_jobs(["once base-eval runs/bench/base/church.json"])[0]
    assert estimate_time.job_seconds(base, measured) == (0.0, 120.0, "eval.py only")


def test_eval_records_its_own_generation_and_scoring_time(tmp_path):
    import eval as evaluate
    from data import pictonette

    folder = tmp_path / "real"
    pictonette.write_folder(str(folder), 1, 1000)
    evaluate.main(evaluate.parse_args([str(folder), "--metrics", "ua", "--device", "cpu"]))
    sec = json.load(open(folder / "metrics.json"))["seconds"]
    assert sec["generate"] < 1 and sec["score"] > 0  # an image folder: nothing generated


import forgetting_curve  # noqa: E402


def _rl_run(root, name, p_values, finished=True):
    run = root / name
    run.mkdir(parents=True)
    lines = [dict(step=i + 1, p_concept_forget=p, rollouts=32 * (i + 1)) for i, p in enumerate(p_values)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (run / "summary.json").write_text("{}")


def test_forgetting_curve_window_means_over_seeds_and_first_crossing(tmp_path, capsys):
    _rl_run(tmp_path, "rl_critic__church__s0", [0.9, 0.7, 0.5, 0.3, 0.1, 0.02])
    _rl_run(tmp_path, "rl_critic__church__s1", [0.9] * 6)
    _rl_run(tmp_path, "rl_critic-nocritic__church__s0", [0.5, 0.05, 0.05, 0.05, 0.05, 0.05])
    _rl_run(tmp_path, "rl_critic__church__s2", [0.0] * 6, finished=False)  # still training: left out
    _rl_run(tmp_path, "rl_critic__parachute__s0", [0.0] * 6)  # another concept: left out
    forgetting_curve.main([str(tmp_path), "--concept", "church", "--at", "64", "192", "999", "--window", "2"])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()}
    crit, base = rows["rl_critic"], rows["rl_critic-nocritic"]
    assert crit[1] == "0, 1" and base[1] == "0"
    assert crit[2] == "0.85 +- 0.07"  # 64 rollouts = iteration 2: seed 0 mean(0.9, 0.7) = 0.8, seed 1 0.9
    assert crit[3] == "0.48 +- 0.59"  # 192: seed 0 mean(0.1, 0.02) = 0.06, seed 1 0.9
    assert crit[4] == "-"  # 999 rollouts were never logged
    assert crit[5] == "192, not reached |"  # seed 0's window mean first < 0.1 at iteration 6
    assert base[2] == "0.28" and base[5] == "96 |"  # one seed: no std; mean(0.5, 0.05), then mean(0.05, 0.05)


def test_forgetting_curve_without_runs_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match="no run folder of 'church'"):
        forgetting_curve.main([str(tmp_path), "--concept", "church"])


# ---------------------------------------------------------------- vae_lines.py: the figures of a line-keeping VAE
import vae_lines  # noqa: E402


def test_vae_line_figures_are_one_and_small_for_the_real_sketch_and_worse_when_blurred():
    import numpy as np
    import pictonette
    from PIL import Image, ImageFilter

    real = pictonette.make(20, seed=5, style="sketch")["images"]
    perfect = vae_lines.line_figures(real, real)
    assert perfect["line_contrast"] == pytest.approx(1.0) and perfect["halo"] < 0.15
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(1))) for im in real])
    soft = vae_lines.line_figures(real, blurred)
    assert soft["line_contrast"] < 0.8 and soft["halo"] > perfect["halo"] + 0.1, soft


class _PoolEncoder:
    """A stand-in VAE whose latent mean is the image average-pooled to 8x8 (RGB plus a zero channel), times `k`."""

    def __init__(self, k: float = 1.0):
        self.k = k

    def encode(self, x):
        import types

        import torch
        import torch.nn.functional as F

        z = F.avg_pool2d(x, 4)
        z = torch.cat([z, torch.zeros_like(z[:, :1])], 1) * self.k
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=z))


def test_latent_geometry_measures_the_sketch_against_the_filled_icon_and_ignores_the_latent_scale():
    """With pooled pixels as latents, the figures are those computed by hand on the same renders; scaling the
    latents changes none of them; a sketch is a weaker, mostly parallel copy of its filled icon in pooled pixels."""
    import numpy as np
    import pictonette
    import torch
    import torch.nn.functional as F
    from build_tiny import to_tensor

    fig = vae_lines.latent_geometry(_PoolEncoder(), n=30, seed=3)
    assert vae_lines.latent_geometry(_PoolEncoder(5.0), n=30, seed=3) == pytest.approx(fig, rel=1e-4)
    rng = np.random.default_rng(3)
    params = [pictonette.sample_params(rng) for _ in range(30)]
    pooled = {
        name: F.avg_pool2d(to_tensor(np.stack([pictonette.render(dict(p, **ch)) for p in params])), 4).flatten(1)
        for name, ch in [("f", dict(style="filled")), ("s", dict(style="sketch")), ("b", dict(scale=1e-4))]
    }
    a, b = pooled["f"] - pooled["b"], pooled["s"] - pooled["b"]
    assert fig["sketch_filled_cos"] == pytest.approx(F.cosine_similarity(a, b).mean().item(), rel=1e-4)
    assert fig["sketch_on_filled"] == pytest.approx(((a * b).sum(1) / (a * a).sum(1)).mean().item(), rel=1e-4)
    assert 0.3 < fig["sketch_on_filled"] < 0.9 and fig["sketch_filled_cos"] > 0.5, fig
    assert torch.isfinite(torch.tensor(fig["style_separation"]))


def test_sketch_rate_reports_every_guidance_and_template_and_refuses_bad_input(tmp_path, capsys):
    """A quick run (1 seed per class, a style judge trained on 8 images per style): one rate per template and
    guidance, each a multiple of 1/10, the latent figures, the JSON written; a folder without tiny-sd/ is refused."""
    import sketch_rate

    out = tmp_path / "rates.json"
    fig = sketch_rate.main(
        sketch_rate.parse_args(
            ["--n", "1", "--judge_train", "8", "--guidance", "1", "7.5", "--negative_prompt", "a sketch of a"]
            + ["--output", str(out)]
        )
    )
    assert list(fig["rates"]) == [
        "a sketch of a {class} @ 1",
        "a sketch of a {class} @ 7.5",
        "an image of a {class} @ 1",
        "an image of a {class} @ 7.5",
        "a sketch of a {class} @ 7.5, negative 'a sketch of a'",
    ]
    assert all(round(v * 10) == pytest.approx(v * 10) for v in fig["rates"].values())
    assert {"sketch_filled_cos", "sketch_on_filled", "style_separation", "style_judge_acc_on_vae_recon"} <= set(fig)
    assert json.loads(out.read_text()) == fig
    for argv, message in [
        (["--data", str(tmp_path)], "--data must be a folder with a diffusers tiny-sd/"),
        (["--guidance", "0.5"], "--guidance values must be >= 1"),
    ]:
        with pytest.raises(SystemExit):
            sketch_rate.parse_args(argv)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["x", "--steps", "0"], "--steps 0 only measures a VAE"),
        (["x", "--widths", "32,sixty"], "--widths must be comma-separated integers"),
        (["x", "--widths", "32,48,64"], "--widths must be multiples of 32"),
        (["x", "--batch", "0"], "--batch must be >= 1"),
        (["x", "--sketch_frac", "2"], "--sketch_frac must be in [0, 1]"),
        (["x", "--style_margin", "-1"], "--style_margin must be >= 0"),
    ],
)
def test_vae_lines_rejects_bad_flags_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        vae_lines.parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_reward_vs_judge_reads_the_run_and_its_eval_sampler_matches_the_judges_quick_check(
    tiny_model, tmp_path, monkeypatch, capsys
):
    """A stand-in run folder (the base UNet, rollouts of 3 steps at eta 1): the eval row's judge rate equals
    common.tiny_judge_accuracies on the same seeds, the other rows use the run's steps and eta; bad input is refused."""
    import reward_vs_judge
    import torch

    import common
    import rl_critic

    torch.manual_seed(0)
    monkeypatch.setattr(rl_critic, "fit_classifier", lambda model, **kw: rl_critic.SmallCNN().eval())  # no 6-min fit
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(os.path.join(ROOT, "data", "tiny-sd", "unet"), run / "unet")
    args = dict(model="tiny", concept="church", sample_steps=3, eta=1.0, guidance=7.5)
    write(run / "args.json", dict(method="rl_critic", args=args))
    table = reward_vs_judge.main(reward_vs_judge.parse_args([str(run), "--n", "6", "--reward_cnn", "small"]))
    rows = {r["sampler"]: r for r in table}
    assert [(rows[s]["steps"], rows[s]["eta"]) for s in reward_vs_judge.SAMPLERS] == [(25, 0.0), (3, 0.0), (3, 1.0)]
    quick = common.tiny_judge_accuracies(tiny_model, [tiny_model.unet], ["church"], 6)[0]["church"]
    assert rows["eval"]["judge_rate"] == pytest.approx(quick) and quick >= 5 / 6  # the base model draws churches
    assert all(0 <= r["small_rate"] <= 1 and 0 <= r["small_p"] <= 1 for r in table)
    assert "| small CNN: concept (mean p)" in capsys.readouterr().out
    with pytest.raises(common.UsageError, match="needs --concept"):
        reward_vs_judge.main(reward_vs_judge.parse_args(["tiny"]))
    with pytest.raises(common.UsageError, match="not a finished rl_critic.py run folder"):
        reward_vs_judge.main(reward_vs_judge.parse_args([str(tmp_path)]))
    with pytest.raises(common.UsageError, match="differs from the run's concept"):
        reward_vs_judge.main(reward_vs_judge.parse_args([str(run), "--concept", "parachute"]))


def test_anchor_rates_samples_each_target_once_per_concept_and_refuses_bad_input(tmp_path, capsys):
    """The unprompted target is the same images for every concept; each row is a distribution over the 10 classes
    in steps of 1/n; --output holds the table; an unknown class and a non-positive eta are refused."""
    import anchor_rates

    import common

    out = tmp_path / "anchor.json"
    argv = ["--concept", "church", "parachute", "--negative_guidance", "1", "--n", "4", "--output", str(out)]
    table = anchor_rates.main(anchor_rates.parse_args(argv))
    assert [(r["concept"], r["target"]) for r in table] == [
        ("church", "empty"),
        ("church", "esd 1"),
        ("parachute", "empty"),
        ("parachute", "esd 1"),
    ]
    assert table[0]["classes"] == table[2]["classes"]  # eps(x, "") does not depend on the concept
    for r in table:
        assert sum(r["classes"].values()) == pytest.approx(1) and r["concept_rate"] == r["classes"][r["concept"]]
        assert all(round(v * 4) == pytest.approx(v * 4) for v in r["classes"].values())
    assert json.loads(out.read_text())["table"] == table and "church | esd 1 |" in capsys.readouterr().out
    with pytest.raises(common.UsageError, match="concept 'bicycle' is not an Imagenette class"):
        anchor_rates.main(anchor_rates.parse_args(["--concept", "bicycle"]))
    with pytest.raises(SystemExit):
        anchor_rates.parse_args(["--negative_guidance", "0"])
