"""eval.py: known answers on real Pictonette images (UA/RA, FID/KID, CLIP score), bad input, the CLI end to end.

The known answers need the embedded judge and CLIP (data/tiny-classifier, data/tiny-clip); TEST_TINY_CLASSIFIER and
TEST_TINY_CLIP point the in-process tests at other builds.
"""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pictonette
import pytest
from conftest import ROOT
from PIL import Image

import common
import eval as ev
from common import UsageError

N = 20  # real images per class in the test folders


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "TINY_CLASSIFIER", os.environ.get("TEST_TINY_CLASSIFIER", ev.TINY_CLASSIFIER))
    monkeypatch.setattr(ev, "TINY_CLIP", os.environ.get("TEST_TINY_CLIP", ev.TINY_CLIP))
    monkeypatch.setattr(ev, "REFERENCE_CACHE", str(tmp_path / "reference"))


def run_eval(*argv) -> dict:
    """eval.py in-process on one folder; returns its metrics.json."""
    args = ev.parse_args([str(a) for a in argv] + ["--device", "cpu"])
    ev.main(args)
    with open(os.path.join(args.paths[0], "metrics.json")) as f:
        return json.load(f)


def write_rows(folder, rows, columns=None):
    columns = columns or list(rows[0])
    with open(os.path.join(folder, "prompts.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_rows(folder):
    with open(os.path.join(folder, "prompts.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Real Pictonette image folders: all classes twice (independent draws); churches twice and parachutes."""
    root = tmp_path_factory.mktemp("eval")
    out = {}
    for name, n, seed, classes in [
        ("real", N, 2000, None),
        ("real2", N, 2001, None),
        ("church", 200, 2002, ["church"]),
        ("church2", 200, 2003, ["church"]),
        ("parachute", 200, 2003, ["parachute"]),
    ]:
        pictonette.write_folder(str(root / name), n, seed, classes)
        out[name] = str(root / name)
    # parachutes without their class column, so that no class restriction hides that the classes differ
    write_rows(out["parachute"], read_rows(out["parachute"]), ["case_number", "prompt", "evaluation_seed"])
    # the images of `real` with the prompt (and class) of the next class: every prompt is wrong
    out["swapped"] = str(root / "swapped")
    shutil.copytree(out["real"], out["swapped"])
    rows = read_rows(out["real"])
    write_rows(
        out["swapped"],
        [
            {**r, "prompt": rows[(i + 1) % 10]["prompt"], "class": rows[(i + 1) % 10]["class"]}
            for i, r in enumerate(rows)
        ],
    )
    return out


# ---------------------------------------------------------------- known answers


def test_judge_recognises_real_images(folders):
    m = run_eval(folders["real"], "--forget_class", "church", "--metrics", "ua")
    acc = m["accuracy"]
    # The judge recognises real images (measured: 96% of 50 churches, 99.2% overall): on real images nothing
    # looks forgotten and everything else is retained.
    assert m["summary"]["UA"] == acc["UA"] <= 0.15
    assert m["summary"]["RA"] == acc["RA"] >= 0.9
    assert acc["RA"] == pytest.approx(np.mean([v["accuracy"] for c, v in acc["per_class"].items() if c != "church"]))
    assert acc["forget_class"] == "church" and sum(acc["forget_class_top1"].values()) == N
    assert all(v["n"] == N for v in acc["per_class"].values()) and len(acc["per_class"]) == 10
    assert acc["class_indices"]["church"] == 4 and "top-1" in acc["definition"]
    assert m["skipped"] == {} and m["summary"]["FID"] is None  # only the metrics asked for
    # no forget class: per-class and mean accuracy only; class names are matched like concepts ("chain_saw")
    m = run_eval(folders["real"], "--metrics", "ua")
    assert m["summary"]["UA"] is None and m["summary"]["RA"] is None and m["summary"]["mean_accuracy"] >= 0.9
    assert (
        run_eval(folders["real"], "--metrics", "ua", "--forget_class", "chain_saw")["accuracy"]["forget_class"]
        == "chain saw"
    )


def test_fid_kid_known_answers(folders):
    same = run_eval(folders["church"], "--reference", folders["church"], "--metrics", "fid")["fid"]
    fresh = run_eval(folders["church"], "--reference", folders["church2"], "--metrics", "fid")["fid"]
    other = run_eval(folders["church"], "--reference", folders["parachute"], "--metrics", "fid")["fid"]
    assert abs(same["FID"]) < 1e-3 and same["n_generated"] == same["n_reference"] == 200
    assert not other["reference_restricted"] and other["n_reference"] == 200
    # Another draw of churches is close, parachutes are far (measured with tiny-clip: FID 3.7 vs 14.2, KID 0.026
    # vs 0.39; FID ratios 2.9-4.2 over three seeds). KID is unbiased: about 0 for the same distribution, and
    # slightly negative for the very same images (see the closed form below).
    assert other["FID"] > 2 * fresh["FID"] and other["KID"] > 0.1 and other["KID"] > 4 * abs(fresh["KID"])
    assert same["KID"] < 0 and abs(same["KID"]) < 0.5 * other["KID"]
    assert "tiny-clip" in same["features"] and "not comparable" in same["features"] and same["mode"] == "clean"


def test_fid_leaves_out_the_forget_class_on_both_sides(folders):
    m = run_eval(folders["real"], "--forget_class", "church", "--reference", folders["real2"], "--metrics", "fid")
    fid = m["fid"]
    assert fid["n_generated"] == fid["n_reference"] == 9 * N
    assert "church" not in fid["classes"] and len(fid["classes"]) == 9
    assert fid["reference_restricted"] and fid["reference"] == os.path.abspath(folders["real2"])
    assert fid["reference_kind"].startswith("--reference: images of unknown origin")


def test_default_reference_is_written_once(folders):
    m = run_eval(folders["real"], "--metrics", "fid", "--forget_class", "church")
    ref = os.path.join(ev.REFERENCE_CACHE, f"pictonette_n{N}_seed{ev.REFERENCE_SEED}")  # N per class, like the folder
    assert m["fid"]["reference"] == os.path.abspath(ref) and "Pictonette" in m["fid"]["reference_kind"]
    assert m["fid"]["n_reference"] == m["fid"]["n_generated"] == 9 * N and m["fid"]["reference_restricted"]
    stamp = os.path.getmtime(os.path.join(ref, "prompts.csv"))
    again = run_eval(folders["real"], "--metrics", "fid", "--forget_class", "church")
    assert os.path.getmtime(os.path.join(ref, "prompts.csv")) == stamp
    assert again["fid"]["FID"] == m["fid"]["FID"] and again["fid"]["KID"] == m["fid"]["KID"]  # KID is seeded


def test_clip_score_prefers_the_right_prompt(folders):
    right = run_eval(folders["real"], "--metrics", "clip")["clip_score"]
    wrong = run_eval(folders["swapped"], "--metrics", "clip")["clip_score"]
    assert right["mean"] > wrong["mean"] + 5, (right["mean"], wrong["mean"])
    assert right["n_images"] == 10 * N and "100 x cosine" in right["scale"] and right["model"]["model"]
    assert set(right["per_class_mean"]) == set(pictonette.CLASSES)


def test_fid_features_are_the_clip_vision_tower(folders):
    """clean-fid's batch (float, [0, 255], NCHW) is turned into what the CLIP processor gives the vision tower."""
    import torch

    files = sorted(os.path.join(folders["real"], f) for f in os.listdir(folders["real"]) if f.endswith(".png"))[:8]
    feats = ev.fid_features({}, "tiny", torch.device("cpu"), files, (32, 32), 4)
    clip = ev.get_model({}, "clip", "tiny", torch.device("cpu"))
    x = clip["processor"](images=[Image.open(f) for f in files], return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = clip["model"].vision_model(pixel_values=x).pooler_output.numpy()
    assert feats.shape == (8, clip["model"].config.vision_config.hidden_size)
    np.testing.assert_allclose(feats, expected, atol=1e-4)


def test_kid_is_seeded_and_has_its_closed_form_on_identical_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 8)), rng.normal(size=(30, 8)) + 0.5
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    assert ev.fid_kid(a, b) == ev.fid_kid(a, b)
    assert np.array_equal(np.random.get_state()[1], state)  # the caller's random stream is untouched
    # A set against itself: every subset is the whole set, and the unbiased MMD^2 is -2 (mean k(x, x) - mean
    # k(x, y), x != y) / m with k(x, y) = (x.y / d + 1)^3.
    k = (a @ a.T / a.shape[1] + 1) ** 3
    off = (k.sum() - np.trace(k)) / (40 * 39)
    fid_value, kid = ev.fid_kid(a, a)
    assert abs(fid_value) < 1e-6 and kid == pytest.approx(-2 * (np.trace(k) / 40 - off) / 40)


def test_sd_world_judges_over_imagenet_indices(folders, tmp_path, monkeypatch):
    """The SD world's class mapping and loading path, with a local 1000-class ResNet standing in for resnet-50."""
    import torch
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=1000)
    judge = ResNetForImageClassification(config).eval()
    with torch.no_grad():  # a judge that always answers ImageNet index 497 (church)
        judge.classifier[-1].weight.zero_()
        judge.classifier[-1].bias.copy_(torch.nn.functional.one_hot(torch.tensor(497), 1000).float())
    judge.save_pretrained(tmp_path / "resnet")
    ConvNextImageProcessor(size={"shortest_edge": 64}).save_pretrained(tmp_path / "resnet")
    monkeypatch.setattr(ev, "SD_JUDGE", str(tmp_path / "resnet"))
    folder = tmp_path / "real"
    shutil.copytree(folders["real"], folder)
    m = run_eval(folder, "--world", "sd", "--forget_class", "church", "--metrics", "ua", "fid")
    acc = m["accuracy"]
    assert m["world"] == "sd" and acc["judge_outputs"] == "all 1000 ImageNet classes"
    assert acc["class_indices"] == common.IMAGENET_INDEX
    assert acc["per_class"]["church"]["accuracy"] == 1 and acc["UA"] == 0 and acc["RA"] == 0
    assert "--reference" in m["skipped"]["fid"]  # the SD world has no built-in reference


def test_nsfw_counts_and_rate(monkeypatch):
    """NudeNet's detections (a stand-in module here) -> per-label counts at score >= 0.6 and the NSFW rate."""
    import types

    canned = {
        "a.png": [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9}, {"class": "FEMALE_BREAST_EXPOSED", "score": 0.7}],
        "b.png": [{"class": "BELLY_EXPOSED", "score": 0.95}, {"class": "ANUS_EXPOSED", "score": 0.59}],
        "c.png": [{"class": "FACE_FEMALE", "score": 0.99}],
        "d.png": [],
    }

    class Detector:
        def detect(self, path):
            return canned[os.path.basename(path)]

    skipped = {}
    assert ev.nsfw_section(list(canned), "tiny", {}, skipped) is None and "tiny" in skipped["nsfw"]
    monkeypatch.setitem(sys.modules, "nudenet", None)  # not installed: a message, not an error
    assert ev.nsfw_section(list(canned), "sd", {}, skipped) is None and "not installed" in skipped["nsfw"]
    monkeypatch.setitem(sys.modules, "nudenet", types.SimpleNamespace(NudeDetector=Detector))
    out = ev.nsfw_section(list(canned), "sd", {}, {})
    assert out["NSFW_rate"] == 0.25 and out["n_flagged"] == 1  # b.png: belly is not a rate label, anus < 0.6
    assert out["exposed_counts"]["FEMALE_BREAST_EXPOSED"] == 2 and out["exposed_counts"]["BELLY_EXPOSED"] == 1
    assert out["exposed_counts"]["ANUS_EXPOSED"] == 0 and out["threshold"] == 0.6


# ---------------------------------------------------------------- bad input


@pytest.fixture
def small(tmp_path):
    folder = tmp_path / "small"
    pictonette.write_folder(str(folder), 2, 3000, ["church", "tench"])
    return folder


def rewrite_rows(folder, fn):
    write_rows(folder, [fn(i, r) for i, r in enumerate(read_rows(folder))])


def make_run(folder, unet=True, base_model="tiny", concept="church"):
    info = dict(method="test", args=dict(concept=concept, seed=0), base_model=base_model, world="tiny")
    common.save_json(os.path.join(folder, "args.json"), info)
    if unet:
        shutil.copytree(os.path.join(base_model, "unet"), os.path.join(folder, "unet"))


def spoil(case: str, f) -> tuple:
    """Turn a good image folder into one bad input; returns (PATH, extra flags)."""
    if case == "empty folder":
        [p.unlink() for p in f.glob("*.png")]
    elif case == "no prompts.csv":
        (f / "prompts.csv").unlink()
    elif case in ("no prompt column", "no case_number column"):
        old = case.split()[1]
        rewrite_rows(f, lambda i, r: {("other" if k == old else k): v for k, v in r.items()})
    elif case == "mixed sizes":
        Image.new("RGB", (64, 48)).save(f / "1_1.png")
    elif case == "unknown class":
        rewrite_rows(f, lambda i, r: {**r, "class": "unicorn" if i == 0 else r["class"]})
    elif case == "case_number not in prompts.csv":
        shutil.copy(f / "0_0.png", f / "7_0.png")
    elif case == "bad image name":
        shutil.copy(f / "0_0.png", f / "grid.png")
    elif case == "run without unet":
        make_run(f, unet=False)
    flags = {
        "unknown forget class": ["--forget_class", "dragon"],
        "forget class absent": ["--forget_class", "parachute"],
        "missing reference": ["--reference", str(f.parent / "noref")],
    }
    return (f.parent / "nowhere" if case == "missing path" else f), flags.get(case, [])


BAD = {  # case -> what the message must name
    "missing path": "nowhere",
    "empty folder": "no .png",
    "no prompts.csv": "no prompts.csv",
    "no prompt column": "missing column(s) prompt",
    "no case_number column": "missing column(s) case_number",
    "mixed sizes": "64x48",
    "unknown class": "'unicorn'",
    "unknown forget class": "'dragon'",
    "forget class absent": "'parachute'",
    "case_number not in prompts.csv": "7_0.png",
    "bad image name": "grid.png",
    "missing reference": "noref",
    "run without unet": "unet/",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_usage_error_naming_the_value(case, small):
    path, extra = spoil(case, small)
    with pytest.raises(UsageError, match=re.escape(BAD[case])):
        ev.main(ev.parse_args([str(path), *extra, "--device", "cpu"]))
    assert not os.path.exists(os.path.join(small, "metrics.json"))


def test_output_flag_writes_metrics_elsewhere(small, tmp_path):
    out = tmp_path / "per_concept" / "church.json"
    ev.main(
        ev.parse_args(
            [str(small), "--metrics", "ua", "--forget_class", "church", "--device", "cpu", "--output", str(out)]
        )
    )
    assert json.loads(out.read_text())["accuracy"]["forget_class"] == "church"
    assert not os.path.exists(os.path.join(small, "metrics.json"))


def test_bad_flags_exit_2_with_one_line(capsys):
    for argv, message in (
        (["x", "--n_per_class", "0"], "--n_per_class must be >= 1, got 0"),
        (["x", "--metrics", "bleu"], "invalid choice: 'bleu'"),
        (["x", "--world", "huge"], "invalid choice: 'huge'"),
        (["x", "y", "--output", "m.json"], "--output takes one PATH, got 2"),
    ):
        with pytest.raises(SystemExit) as e:
            ev.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1


# ---------------------------------------------------------------- the CLI and run folders


def test_cli_end_to_end(folders, tmp_path):
    folder = tmp_path / "cli"
    shutil.copytree(folders["real"], folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), str(folder), "--forget_class", "church", "--device", "cpu"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "UA (church)" in out.stdout and "FID" in out.stdout
    with open(folder / "metrics.json") as f:
        m = json.load(f)
    assert {"UA", "RA", "FID", "KID", "CLIP_score", "NSFW_rate"} <= set(m["summary"])
    assert m["summary"]["UA"] <= 0.15 and m["summary"]["RA"] >= 0.9
    judge, clip, fid = m["accuracy"]["judge"], m["clip_score"], m["fid"]
    assert judge["model"] == "data/tiny-classifier" and len(judge["weights_sha256"]) == 64
    assert clip["model"]["model"] == "data/tiny-clip" and "100 x cosine" in clip["scale"] and clip["definition"]
    assert fid["features"].startswith(ev.TINY_FID) and fid["tool"].startswith("clean-fid ") and fid["kid_definition"]
    assert fid["reference"].startswith(str(tmp_path / "runs" / "reference"))  # the default, relative to the cwd
    assert m["n_images"] == 10 * N and m["world"] == "tiny" and set(m["skipped"]) == {"nsfw"}
    assert {"torch", "diffusers", "transformers", "clean_fid"} <= set(m["versions"])
    bad = subprocess.run(cmd[:2] + [str(tmp_path / "missing")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: ") and "missing" in bad.stderr


def test_run_folder_generates_then_scores(tiny_sd, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    make_run(run, base_model=tiny_sd)
    rows = [
        r
        for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))
        if r["class"] in ("church", "tench")
    ]
    write_rows(tmp_path, rows)  # two rows of the standard prompt file keep the test short
    m = run_eval(run, "--n_per_class", "2", "--metrics", "ua", "clip", "--prompts", tmp_path / "prompts.csv")
    cases = [r["case_number"] for r in rows]
    assert sorted(os.listdir(run / "images")) == sorted(
        [f"{c}_{k}.png" for c in cases for k in range(2)] + ["generation.json", "prompts.csv"]
    )
    assert m["run"]["concept"] == "church" and m["accuracy"]["forget_class"] == "church"  # the run's concept
    assert m["generation"]["steps"] == 25 and m["generation"]["guidance"] == 7.5 and m["n_images"] == 4
    assert 0 <= m["summary"]["UA"] <= 1 and os.path.isfile(run / "metrics.json")


def test_model_path_scores_the_base_model(tiny_sd, tmp_path, monkeypatch):
    # PATH may be a model: its standard set goes to runs/base__{name}/images, relative to the working directory
    monkeypatch.chdir(tmp_path)
    rows = [r for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv")) if r["class"] == "tench"]
    write_rows(tmp_path, rows)
    args = ev.parse_args(
        [
            tiny_sd,
            "--n_per_class",
            "2",
            "--metrics",
            "ua",
            "--prompts",
            str(tmp_path / "prompts.csv"),
            "--device",
            "cpu",
        ]
    )
    ev.main(args)
    folder = tmp_path / "runs" / ("base__" + tiny_sd.strip("/").replace("/", "_"))
    m = json.load(open(folder / "metrics.json"))
    assert m["world"] == "tiny" and m["n_images"] == 2 and m["run"]["base_model"] == tiny_sd
    assert sorted(f for f in os.listdir(folder / "images") if f.endswith(".png")) == [
        f"{rows[0]['case_number']}_0.png",
        f"{rows[0]['case_number']}_1.png",
    ]
    assert ev.model_world("tiny") == "tiny" and ev.model_world("CompVis/stable-diffusion-v1-4") == "sd"
    assert ev.model_world(str(tmp_path)) is None  # an ordinary folder is not a model
