"""fdiv.py: closed forms against numerical f-divergences of Gaussians, Fenchel duality of the f-GAN pairs, the ESD
target, the parameter groups, gradient surgery, run folders, --resume, bad flags, and forgetting on the tiny world."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, judge_accuracies

import common
import fdiv

FAST = ["--num_anchor_samples", "4", "--gen_steps", "2", "--batch_size", "4", "--log_every", "1"]


# ---------------------------------------------------------------- the divergences


def gaussian_f_divergence(f, d: float, sigma: float) -> float:
    """D_f(P || Q) = int q f(p / q) dx for P = N(0, sigma^2), Q = N(d, sigma^2), by quadrature on a fine grid."""
    x = np.linspace(-14 * sigma, d + 14 * sigma, 400_001)
    p = np.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    q = np.exp(-((x - d) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    keep = (p > 1e-300) & (q > 1e-300)
    u = torch.from_numpy(p[keep] / q[keep])
    integrand = q[keep] * f(u).numpy()
    return float(np.trapezoid(integrand, x[keep]))


# How each implemented loss maps to the divergence it stands for (loss = a * D + b): see fdiv.CLOSED_FORMS.
AS_DIVERGENCE = {
    "mse": ("kl", lambda loss, s: loss / (2 * s**2)),
    "kl": ("kl", lambda loss, s: loss),
    "reverse_kl": ("reverse_kl", lambda loss, s: loss),
    "hellinger": ("hellinger", lambda loss, s: 2 * (loss + 1)),
    "pearson_chi2": ("pearson_chi2", lambda loss, s: loss - 1),
    "total_variation": ("total_variation", lambda loss, s: loss),
}


@pytest.mark.parametrize("name", list(fdiv.CLOSED_FORMS))
def test_closed_forms_match_numerical_f_divergence_of_gaussians(name):
    div, to_divergence = AS_DIVERGENCE[name]
    f = fdiv.F_GAN[div][0]
    for sigma in [1.0, 0.7]:
        for d in [0.05, 0.3, 1.0, 2.0]:
            loss = fdiv.CLOSED_FORMS[name](torch.tensor(d**2, dtype=torch.float64), sigma).item()
            numeric = gaussian_f_divergence(f, d, sigma)
            assert to_divergence(loss, sigma) == pytest.approx(numeric, rel=1e-4, abs=1e-9), (name, sigma, d)


def test_closed_form_loss_is_the_official_channel_sum_of_spatial_means_then_batch_mean():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 2  # spatial means 1 and 4 per channel, summed over the 4 channels: m = 4 and 16
    target[0, 0, 0, 0] = 3  # channel 0 of sample 0: mean of (9, 1, 1, 1) = 3, so m = 3 + 1 + 1 + 1 = 6
    assert fdiv.distance(pred, target).tolist() == [6.0, 16.0]
    assert fdiv.closed_form_loss(pred, target, "mse", 1.0).item() == pytest.approx(11.0)
    expected = -(math.exp(-6 / 8) + math.exp(-16 / 8)) / 2
    assert fdiv.closed_form_loss(pred, target, "hellinger", 1.0).item() == pytest.approx(expected)


def test_gradient_geometry_hellinger_gentler_chi2_harsher():
    """The paper's point: relative to MSE, Hellinger down-weights large errors and chi^2 up-weights them."""
    m = torch.tensor([0.1, 1.0, 4.0], dtype=torch.float64, requires_grad=True)
    slopes = {}
    for name in ["mse", "hellinger", "pearson_chi2"]:
        (g,) = torch.autograd.grad(fdiv.CLOSED_FORMS[name](m, 1.0).sum(), m)
        slopes[name] = g / g[0]  # slope at m relative to the slope at small m
    assert (slopes["hellinger"][1:] < 1).all() and (slopes["pearson_chi2"][1:] > 1).all()
    assert torch.allclose(slopes["mse"], torch.ones(3, dtype=torch.float64))


# v ranges where the conjugate's maximiser lies inside the generator's domain u > 0
V_RANGES = {
    "kl": (-3, 3),
    "reverse_kl": (-3, 3),
    "hellinger": (-2, 1.5),
    "jensen_shannon": (-3, 3),
    "pearson_chi2": (-1.9, 3),
    "total_variation": (-3, 3),
}


@pytest.mark.parametrize("name", list(V_RANGES))
def test_fgan_pairs_satisfy_fenchel_duality(name):
    """f*(t) >= u t - f(u) for every u > 0, with equality at the maximiser: f*(t) = sup_u u t - f(u)."""
    f, g, f_star = fdiv.F_GAN[name]
    u = torch.logspace(-4, 2.5, 200_001, dtype=torch.float64)
    fu = f(u)
    t = g(torch.linspace(*V_RANGES[name], 41, dtype=torch.float64))
    sup = (u[None] * t[:, None] - fu[None]).max(1).values
    fs = f_star(t)
    assert (fs >= sup - 1e-9).all(), name
    assert torch.allclose(fs, sup, atol=1e-5), (name, (fs - sup).abs().max())


def test_variational_losses_are_the_fgan_bound():
    v_ref, v_theta = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    for name, (_, g, f_star) in fdiv.F_GAN.items():
        assert torch.allclose(
            fdiv.discriminator_loss(v_ref, v_theta, name), f_star(g(v_theta)).mean() - g(v_ref).mean()
        )
        assert torch.allclose(fdiv.variational_loss(v_theta, name), -f_star(g(v_theta)).mean())


def test_discriminator_shapes_and_spectral_norm():
    disc = fdiv.Discriminator(4)
    assert disc(torch.randn(3, 4, 8, 8)).shape == (3, 1, 2, 2)
    assert disc(torch.randn(1, 4, 64, 64)).shape == (1, 1, 16, 16)
    assert sum("parametrizations" in n for n, _ in disc.named_parameters()) >= 3


# ---------------------------------------------------------------- targets, parameters, surgery


def test_esd_target_equals_its_formula(tiny_model):
    args = fdiv.parse_args(["--anchor", "esd", "--negative_guidance", "1.5"])
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(3, *tiny_model.latent_shape, generator=gen)
    t = torch.tensor([10, 500, 900])
    c_f = common.encode_prompts(tiny_model, ["an image of a church"] * 3)
    c_e = common.encode_prompts(tiny_model, [""] * 3)
    got = fdiv.fdiv_targets(tiny_model.unet, x_t, t, None, c_f, c_e, args)
    with torch.no_grad():
        eps_e, eps_c = tiny_model.unet(x_t, t, c_e).sample, tiny_model.unet(x_t, t, c_f).sample
    assert torch.allclose(got, eps_c - 1.5 * (eps_c - eps_e), atol=1e-5)  # esd_sd.py's line, eta 1.5
    # and the plain anchor target is the reference under the anchor prompt
    args = fdiv.parse_args(["--anchor", "gas pump"])
    c_a = common.encode_prompts(tiny_model, ["an image of a gas pump"] * 3)
    with torch.no_grad():
        assert torch.allclose(
            fdiv.fdiv_targets(tiny_model.unet, x_t, t, c_a, c_f, c_e, args),
            tiny_model.unet(x_t, t, c_a).sample,
            atol=1e-6,
        )


def test_esd_xt_is_the_pipelines_own_partial_sample(tiny_sd, tiny_model):
    """esd_sd.py's x_t: StableDiffusionPipeline with the model's own scheduler (tiny-sd: DDPM, ancestral noise from
    the same generator) at guidance 3, stopped after run_till of 50 steps; the UNet then sees timesteps[run_till]."""
    import copy

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = copy.deepcopy(tiny_model.scheduler)
    pipe.set_progress_bar_config(disable=True)
    cond = common.encode_prompts(tiny_model, ["an image of a church"])
    for run_till in [0, 1, 7]:
        seen = {}

        def keep(pipe, i, t, kwargs, run_till=run_till, seen=seen):
            if i == run_till - 1:
                seen["x"] = kwargs["latents"].clone()
            return kwargs

        pipe("an image of a church", num_inference_steps=fdiv.ESD_STEPS, guidance_scale=fdiv.ESD_GUIDANCE,
             generator=torch.Generator().manual_seed(3), output_type="latent", callback_on_step_end=keep)  # fmt: skip
        gen = torch.Generator().manual_seed(3)
        z_T = torch.randn(1, *tiny_model.latent_shape, generator=gen)
        x_t, t = fdiv.esd_xt(tiny_model, cond, z_T, run_till, gen)
        assert torch.allclose(x_t, seen.get("x", z_T), atol=1e-4)
        assert t == int(pipe.scheduler.timesteps[run_till])


def test_esd_defaults_are_the_official_scripts():
    """esd_sd.py: one image per iteration, negative guidance 2; the cached variant keeps the world's batch."""
    args = fdiv.parse_args(["--anchor", "esd"])
    fdiv.fill_world_defaults(args, "tiny")
    assert (args.esd_xt, args.batch_size, args.negative_guidance, args.steps) == ("sample", 1, 2.0, 200)
    args = fdiv.parse_args(["--anchor", "esd", "--esd_xt", "cached"])
    fdiv.fill_world_defaults(args, "tiny")
    assert args.batch_size == 16
    assert (fdiv.ESD_STEPS, fdiv.ESD_GUIDANCE) == (50, 3.0)


def test_xattn_kv_selects_exactly_to_k_and_to_v_of_attn2(tiny_model):
    unet = common.trainable_unet(tiny_model)
    chosen = {id(p) for p in common.select_params(unet, "xattn-kv")}
    names = [n for n, p in unet.named_parameters() if id(p) in chosen]
    expected = [n for n, _ in unet.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n]
    assert names == expected and len(names) > 0
    assert all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in names)  # SD's to_k/to_v have no bias
    assert all(p.requires_grad == (id(p) in chosen) for p in unet.parameters())


def test_anchor_prompts_replace_the_concept():
    prompts = common.concept_prompts("church")
    assert fdiv.anchor_prompts(prompts, "gas pump") == ["an image of a gas pump"]
    assert fdiv.anchor_prompts(prompts, "") == [""]
    assert fdiv.anchor_prompts(prompts, "a photo of a red building") == ["a photo of a red building"]
    nudity = common.concept_prompts("nudity")
    assert set(fdiv.anchor_prompts(nudity, "a person wearing clothes")) == {"a person wearing clothes"}


def test_surgery_removes_only_conflicting_components():
    p1, p2 = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    g_f = [torch.tensor([1.0, -1.0]), torch.tensor([1.0, 1.0])]
    g_p = [torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])]
    fdiv.surgery([p1, p2], g_f, g_p, weight=0.5)
    assert torch.allclose(p1.grad, torch.tensor([1.0, 0.5]))  # conflict: the -1 along g_p removed, then + 0.5 g_p
    assert torch.allclose(p2.grad, torch.tensor([1.5, 1.0]))  # no conflict: kept, + 0.5 g_p


# ---------------------------------------------------------------- runs, resume, errors


def run_fdiv(argv, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "fdiv.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--anchor", "esd", "--divergence", "mse"],  # ESD's own x_t, sampled every step
        ["--anchor", "esd", "--divergence", "mse", "--esd_xt", "cached"],
        ["--variational", "--divergence", "jensen_shannon", "--disc_warmup_steps", "1"],
        ["--prior_loss_weight", "0.5", "--num_retain_samples", "3"],
        ["--dtype", "bf16"],  # the GPU user's regime on the CPU: untouched tensors must stay the base's fp32 ones
        ["--dtype", "bf16", "--variational", "--divergence", "jensen_shannon", "--disc_warmup_steps", "1"],
    ],
)
def test_smoke_run_writes_a_complete_run_folder(tiny_sd, tmp_path, extra):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    run = tmp_path / "run"
    out = run_fdiv(["--model", tiny_sd, "--steps", "3", "--out_dir", str(run), *FAST, *extra])
    assert "fdiv step 3/3" in out.stdout and "time per step / its UNet passes" in out.stdout
    record = json.loads((run / "args.json").read_text())
    assert record["method"] == "fdiv" and record["world"] == "tiny" and record["args"]["lr"] == 1e-3
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3] and all(np.isfinite(ln["m"]) for ln in lines)
    assert all("loss" in ln for ln in lines[1:]) and ("loss_disc" in lines[0]) == ("--variational" in extra)
    unet = UNet2DConditionModel.from_pretrained(run / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    changed = [n for (n, p), q in zip(unet.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert record["args"]["train_params"] == "xattn-kv" and changed  # the default, with --anchor esd too
    assert all("attn2.to_k." in n or "attn2.to_v." in n for n in changed)
    assert Image.open(run / "samples.png").width > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["step_efficiency"] > 0 and summary["peak_memory_mb"] > 0


@pytest.mark.parametrize("extra", [[], ["--anchor", "esd", "--divergence", "mse"]])
def test_resume_continues_where_the_run_stopped(tiny_sd, tmp_path, extra):
    flags = ["--model", tiny_sd, *FAST, "--save_every", "2", *extra]
    fdiv.main(fdiv.parse_args(["--steps", "2", "--out_dir", str(tmp_path / "a"), *flags]))
    fdiv.main(fdiv.parse_args(["--steps", "4", "--out_dir", str(tmp_path / "a"), "--resume", *flags]))
    fdiv.main(fdiv.parse_args(["--steps", "4", "--out_dir", str(tmp_path / "b"), *flags]))
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # same weights as the uninterrupted run


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--divergence", "jensen_shannon"], "--divergence jensen_shannon has no closed form; add --variational"),
        (["--divergence", "alpha"], "invalid choice: 'alpha'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--sigma", "0"], "--sigma must be > 0"),
        (["--train_params", "attn"], "invalid choice: 'attn'"),
        (["--esd_xt", "noised"], "invalid choice: 'noised'"),
    ],
)
def test_bad_flags_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        fdiv.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


# ---------------------------------------------------------------- efficacy on the tiny world


@pytest.mark.parametrize(
    "dtype,extra",
    [
        ("fp32", []),
        ("bf16", []),  # the GPU user's regime (CPU autocast, bf16 frozen models)
        ("fp32", ["--anchor", "esd", "--divergence", "mse"]),  # ESD, its x_t sampled as esd_sd.py
    ],
)
def test_forgets_church_and_keeps_the_other_classes(tiny_sd, tmp_path, dtype, extra):
    """A default-flag run: the judge must stop seeing churches on the evaluation seeds while it still sees the other
    classes about as often as before: their mean within 5 points (the README's RA bar), no single class down by more
    than 30. All 10 classes, 16 images each: one image is 6 points of a class, so a per-class 15-point check is
    within the noise (on the silhouette-sketch build it failed on tench, 1.00 -> 0.81, a run whose eval.py figures,
    50 images per class, are tench 0.94 -> 0.82 and RA 0.982 -> 0.958: the bar met)."""
    from diffusers import UNet2DConditionModel

    if os.path.abspath(tiny_sd) != common.TINY:
        pytest.skip("needs the committed tiny model (data/tiny-sd)")
    argv = ["--concept", "church", "--dtype", dtype, "--out_dir", str(tmp_path / "run"), *extra]
    run = fdiv.main(fdiv.parse_args(argv))
    model = common.load_model(tiny_sd, device="cpu", dtype=dtype)
    trained = UNet2DConditionModel.from_pretrained(os.path.join(run, "unet")).eval()
    classes = [r["class"] for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))]
    before, after = judge_accuracies(model, [model.unet, trained], classes, n=16)
    print(f"judge accuracy before {before}, after {after}")
    others = [c for c in classes if c != "church"]
    kept_before, kept_after = (sum(acc[c] for c in others) / len(others) for acc in (before, after))
    assert before["church"] >= 0.75 and kept_before >= 0.75, f"the base model's images are not recognised ({before})"
    assert after["church"] <= 0.1, f"church was not forgotten: {before['church']:.2f} -> {after['church']:.2f}"
    assert kept_after >= kept_before - 0.05, f"the other classes were damaged: {kept_before:.3f} -> {kept_after:.3f}"
    for cls in others:
        assert after[cls] >= before[cls] - 0.3, f"{cls} was damaged: {before[cls]:.2f} -> {after[cls]:.2f}"
