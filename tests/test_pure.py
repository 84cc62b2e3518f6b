"""pure.py: the forget loss against its closed form, the KL trust region, the schedule, the step, run folders,
--resume, bad flags, and forgetting on the tiny world judged by the tiny classifier."""

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
import pure

# Flags that make a run take seconds: few cached images, few sampling steps.
FAST = [
    "--num_forget_samples",
    "4",
    "--num_retain_samples",
    "6",
    "--gen_steps",
    "2",
    "--batch_size",
    "4",
    "--log_every",
    "1",
]


# ---------------------------------------------------------------- the forget loss


def test_forget_loss_at_zero_is_log2_with_slope_minus_half():
    for beta in [0.1, 1.0, 10.0, 500.0]:
        theta = torch.zeros((), requires_grad=True)
        delta = 3.0 * theta + theta**2  # Delta(0) = 0, dDelta/dtheta = 3 at theta = 0
        loss = pure.forget_loss(delta.reshape(1), beta, "npo").sum()
        assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)
        (grad,) = torch.autograd.grad(loss, theta)
        assert grad.item() == pytest.approx(-0.5 * 3.0, rel=1e-6)  # -1/2 dDelta/dtheta


def test_forget_loss_gradient_is_minus_sigmoid_and_saturates():
    beta = 10.0
    delta = torch.tensor([-0.5, 0.0, 0.3, 2.0, 10.0], requires_grad=True)
    loss = pure.forget_loss(delta, beta, "npo")
    (grad,) = torch.autograd.grad(loss.sum(), delta)
    assert torch.allclose(grad, -torch.sigmoid(-beta * delta.detach() / 2), atol=1e-7)
    assert torch.allclose(loss, -(2 / beta) * torch.nn.functional.logsigmoid(beta * delta / 2))
    # saturation: far past Delta ~ 6/beta the loss and its gradient vanish, unlike gradient ascent
    assert loss[-1].item() < 1e-20 and abs(grad[-1].item()) < 1e-20
    assert (grad[:-1].abs() > grad[1:].abs()).all()  # the weight fades monotonically as Delta grows


def test_forget_loss_becomes_gradient_ascent_as_beta_goes_to_zero():
    delta = torch.linspace(-1, 1, 9, dtype=torch.float64, requires_grad=True)  # float64: L_F ~ 1/beta
    for beta in [1e-2, 1e-4]:
        loss = pure.forget_loss(delta, beta, "npo")
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        assert torch.allclose(grad, torch.full_like(grad, -0.5), atol=beta)
        assert torch.allclose(loss - 2 / beta * math.log(2), -delta.detach() / 2, atol=2 * beta)
    ga = pure.forget_loss(delta, 1.0, "ga")
    (grad,) = torch.autograd.grad(ga.sum(), delta)
    assert torch.equal(grad, torch.full_like(grad, -0.5))  # NPO's limit: plain ascent, no saturation anywhere


# ---------------------------------------------------------------- the trust region and the step


def test_kl_is_zero_and_delta_is_zero_for_theta_equal_ref(tiny_model):
    args = pure.parse_args(["--beta", "10"])
    unet = common.trainable_unet(tiny_model)
    x = torch.randn(6, *tiny_model.latent_shape)
    c = common.encode_prompts(tiny_model, ["an image of a church"] * 3 + ["an image of a tench"] * 3)
    weights = pure.kl_weights(tiny_model.scheduler, "true")
    torch.manual_seed(0)
    _, forget = pure.pure_step(
        unet, tiny_model.unet, tiny_model.scheduler, "forget", x[:3], c[:3], x[3:], c[3:], args, weights
    )
    _, repair = pure.pure_step(
        unet, tiny_model.unet, tiny_model.scheduler, "repair", x[:3], c[:3], x[3:], c[3:], args, weights
    )
    assert forget["kl"].item() == 0.0 and repair["kl"].item() == 0.0 and forget["delta"].item() == 0.0
    assert forget["loss_forget"].item() == pytest.approx(2 / 10 * math.log(2), rel=1e-6)
    # and it is positive as soon as theta moves away from the reference
    with torch.no_grad():
        unet.conv_out.bias.add_(0.1)
    _, moved = pure.pure_step(
        unet,
        tiny_model.unet,
        tiny_model.scheduler,
        "repair",
        x[:3],
        c[:3],
        x[3:],
        c[3:],
        args,
        pure.kl_weights(tiny_model.scheduler, "uniform"),
    )
    # a constant 0.1 offset on every output: mean square 0.01
    assert moved["kl"].item() == pytest.approx(0.01, rel=1e-3)


def test_true_kl_weight_is_the_reverse_kernel_kl():
    """w(t) is proportional to KL(N(mu_1, beta_t I) || N(mu_2, beta_t I)) / ||eps_1 - eps_2||^2 with DDPM's means."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    w = pure.kl_weights(sched, "true")
    assert w.shape == (1000,) and w.mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(pure.kl_weights(sched, "uniform"), torch.ones(1000))
    gen = torch.Generator().manual_seed(0)
    x_t, e1, e2 = (torch.randn(4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ratios = []
    for t in [0, 10, 300, 999]:
        b, abar = sched.betas[t].double(), sched.alphas_cumprod[t].double()
        mu1, mu2 = ((x_t - b / (1 - abar).sqrt() * e) / (1 - b).sqrt() for e in (e1, e2))  # DDPM's mu_theta
        kl = ((mu1 - mu2) ** 2).sum() / (2 * b)
        ratios.append((kl / ((e1 - e2) ** 2).mean() / w[t]).item())
    assert np.allclose(ratios, ratios[0], rtol=1e-5)


def test_one_step_is_one_call_per_model_on_the_joint_batch(tiny_model):
    """Performance rule: the forget and retain halves go through each UNet in one call, no per-sample loop."""
    args = pure.parse_args([])
    args.beta = 10.0
    unet = common.trainable_unet(tiny_model)
    calls = {"trained": [], "ref": []}
    h1 = unet.register_forward_hook(lambda m, i, o: calls["trained"].append(len(i[0])))
    h2 = tiny_model.unet.register_forward_hook(lambda m, i, o: calls["ref"].append(len(i[0])))
    x, c = torch.randn(5, *tiny_model.latent_shape), common.encode_prompts(tiny_model, ["a"] * 5)
    w = pure.kl_weights(tiny_model.scheduler, "uniform")
    try:
        pure.pure_step(unet, tiny_model.unet, tiny_model.scheduler, "forget", x, c, x, c, args, w)
        assert calls == {"trained": [10], "ref": [10]}
        args.kl_weight = 0.0  # no trust region: the retain half is not computed at all
        pure.pure_step(unet, tiny_model.unet, tiny_model.scheduler, "forget", x, c, x, c, args, w)
        pure.pure_step(unet, tiny_model.unet, tiny_model.scheduler, "repair", x, c, x, c, args, w)
        assert calls == {"trained": [10, 5, 5], "ref": [10, 5, 5]}
    finally:
        h1.remove()
        h2.remove()


# ---------------------------------------------------------------- the schedule and the cached sets


def test_schedule_order_and_counts():
    F, R = "forget", "repair"
    assert pure.schedule(4, 2, 1) == [F, F, R, F, F, R]
    assert pure.schedule(5, 2, 3) == [F, F, R, R, R, F, F, R, R, R, F, R, R, R]  # the short block is repaired too
    assert pure.schedule(3, 10, 0) == [F, F, F]  # no repair
    plan = pure.schedule(100, 10, 5)
    assert plan.count(F) == 100 and plan.count(R) == 50 and plan[:15] == [F] * 10 + [R] * 5
    assert pure.schedule(6, 2, 1)[:6] == pure.schedule(4, 2, 1)  # extending --steps by whole cycles keeps the prefix


def test_cached_set_is_deterministic_and_spreads_the_prompts(tiny_model):
    prompts = ["an image of a tench", "an image of a church", "an image of a golf ball"]
    a, ia = pure.make_cached_set(tiny_model, prompts, 7, 100, steps=2, guidance=7.5, batch=3, desc="t")
    b, ib = pure.make_cached_set(tiny_model, prompts, 7, 100, steps=2, guidance=7.5, batch=7, desc="t")
    assert a.shape == (7, *tiny_model.latent_shape) and a.dtype == torch.float32
    assert ia.tolist() == [0, 1, 2, 0, 1, 2, 0] and torch.equal(ia, ib)
    assert torch.allclose(a, b, atol=1e-4)  # image i depends on its seed only, not on the batching
    c, _ = pure.make_cached_set(tiny_model, prompts, 7, 200, steps=2, guidance=7.5, batch=7, desc="t")
    assert not torch.allclose(a, c)


# ---------------------------------------------------------------- runs, resume, errors


def run_pure(argv, check=True):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "pure.py"), *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_smoke_run_writes_a_complete_run_folder(tiny_sd, tmp_path, dtype):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    run = tmp_path / "run"
    out = run_pure(
        [
            "--dtype",
            dtype,
            "--model",
            tiny_sd,
            "--steps",
            "2",
            "--forget_steps_per_cycle",
            "1",
            "--repair_steps_per_cycle",
            "1",
            "--lr_warmup",
            "4",
            "--out_dir",
            str(run),
            *FAST,
        ]
    )
    assert "pure step 4/4 phase repair forget_step 2" in out.stdout and "sec_per_step" in out.stdout
    record = json.loads((run / "args.json").read_text())
    assert record["method"] == "pure" and record["world"] == "tiny"
    assert record["args"]["lr"] == 1e-3 and record["args"]["beta"] is not None  # resolved world defaults are recorded
    lines = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [1, 2, 3, 4]
    assert [ln["phase"] for ln in lines] == ["forget", "repair", "forget", "repair"]
    assert [ln["lr"] for ln in lines] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # --lr_warmup 4
    assert all(np.isfinite(ln["loss"]) and ln["sec_per_step"] > 0 for ln in lines)
    unet = UNet2DConditionModel.from_pretrained(run / "unet")
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    changed = [n for (n, p), q in zip(unet.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert changed and all("attn2.to_k." in n or "attn2.to_v." in n for n in changed)  # the rest is the fp32 base
    grid = Image.open(run / "samples.png")
    assert grid.width > grid.height  # before | after, side by side
    # a finished run is not overwritten by accident
    again = run_pure(["--model", tiny_sd, "--steps", "2", "--out_dir", str(run), *FAST], check=False)
    assert again.returncode == 2 and "--resume" in again.stderr


def test_resume_continues_where_the_run_stopped(tiny_sd, tmp_path):
    common_flags = ["--model", tiny_sd, "--forget_steps_per_cycle", "2", "--repair_steps_per_cycle", "1", *FAST]
    pure.main(pure.parse_args(["--steps", "2", "--out_dir", str(tmp_path / "a"), *common_flags]))
    pure.main(pure.parse_args(["--steps", "4", "--out_dir", str(tmp_path / "a"), "--resume", *common_flags]))
    pure.main(pure.parse_args(["--steps", "4", "--out_dir", str(tmp_path / "b"), *common_flags]))
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # same weights as the uninterrupted run
    # resuming with a schedule that differs before the checkpoint is refused
    with pytest.raises(common.UsageError, match="schedule"):
        pure.main(
            pure.parse_args(
                [
                    "--steps",
                    "8",
                    "--out_dir",
                    str(tmp_path / "a"),
                    "--resume",
                    *common_flags[:2],
                    "--forget_steps_per_cycle",
                    "3",
                    *FAST,
                ]
            )
        )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--lr", "-1"], "--lr must be > 0"),
        (["--lr_warmup", "-5"], "--lr_warmup must be >= 0"),
        (["--forget_loss", "dpo"], "invalid choice: 'dpo'"),
        (["--kl_weighting", "snr"], "invalid choice: 'snr'"),
        (["--kl_t_sampling", "uniform"], "invalid choice: 'uniform'"),
        (["--repair_steps_per_cycle", "-2"], "--repair_steps_per_cycle must be >= 0"),
        (["--retain_prompts", "/no/such/file.csv"], "is not a file"),
    ],
)
def test_bad_flags_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pure.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_unknown_concept_is_one_line_before_loading_anything():
    out = run_pure(["--concept", "van gogh", "--model", "/no/such/model"], check=False)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--retain_prompts" in out.stderr


def test_sd_shaped_model_gets_the_sd_defaults(tiny_sd, tmp_path):
    """A 256-px Stable-Diffusion-shaped folder (random weights) is the "sd" world: its defaults apply (lr, batch, beta,
    sampling steps, gradient checkpointing) and the run completes with gradient checkpointing on."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.unet = UNet2DConditionModel(
        sample_size=32,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        norm_num_groups=8,
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=pipe.text_encoder.config.hidden_size,
    )
    pipe.vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8,
        latent_channels=4,
    )
    pipe.save_pretrained(tmp_path / "sd-shaped")
    run = pure.main(
        pure.parse_args(
            [
                "--model",
                str(tmp_path / "sd-shaped"),
                "--steps",
                "1",
                "--out_dir",
                str(tmp_path / "run"),
                "--num_forget_samples",
                "2",
                "--num_retain_samples",
                "2",
                "--gen_steps",
                "1",
            ]
        )
    )
    args = json.loads(open(os.path.join(run, "args.json")).read())["args"]
    assert (args["lr"], args["batch_size"], args["beta"], args["gradient_checkpointing"]) == (1e-5, 4, 500.0, True)
    assert os.path.isfile(os.path.join(run, "unet", "config.json")) and os.path.isfile(os.path.join(run, "samples.png"))


# ---------------------------------------------------------------- efficacy on the tiny world

KEPT_CLASSES = ["tench", "garbage truck", "parachute"]


def test_forgets_church_and_keeps_the_other_classes(tiny_sd, tmp_path):
    """A default-flag run (seed 0): the judge must stop seeing churches on the evaluation seeds while it still sees
    the other classes about as often as before."""
    from diffusers import UNet2DConditionModel

    if os.path.abspath(tiny_sd) != common.TINY:
        pytest.skip("needs the committed tiny model (data/tiny-sd)")
    run = pure.main(pure.parse_args(["--concept", "church", "--out_dir", str(tmp_path / "run")]))
    model = common.load_model(tiny_sd, device="cpu")
    trained = UNet2DConditionModel.from_pretrained(os.path.join(run, "unet")).eval()
    before, after = judge_accuracies(model, [model.unet, trained], ["church", *KEPT_CLASSES], n=16)
    print(f"judge accuracy before {before}, after {after}")
    assert min(before.values()) >= 0.75, f"the base model's images are not recognised ({before}): cannot judge"
    assert after["church"] <= 0.1, f"church was not forgotten: {before['church']:.2f} -> {after['church']:.2f}"
    for cls in KEPT_CLASSES:
        assert after[cls] >= before[cls] - 0.15, f"{cls} was damaged: {before[cls]:.2f} -> {after[cls]:.2f}"


def test_importance_sampling_draws_retain_t_in_proportion_to_w_and_keeps_the_expectation(tiny_model):
    w = pure.kl_weights(tiny_model.scheduler, "true")
    f = torch.linspace(0, 1, 1000) ** 0.5  # some per-t KL d(t)
    torch.manual_seed(0)
    args = pure.parse_args(["--kl_t_sampling", "importance", "--forget_t_min", "500"])
    t, w_used = pure.draw_timesteps(1000, 201000, w, args)
    assert torch.equal(w_used, torch.ones(1000))  # each retain term then counts once
    assert (t[:1000] >= 500).all()  # the forget images keep their own draw
    retain = t[1000:]
    assert (retain == 0).float().mean().item() == pytest.approx((w[0] / w.sum()).item(), rel=0.05)
    # E_{t~w/sum w}[d(t)] = E_{t~U}[w(t) d(t)]: the weighted estimator's expectation, computed exactly
    assert f[retain].mean().item() == pytest.approx((w * f).mean().item(), rel=0.01)
    weighted = pure.parse_args(["--kl_t_sampling", "weighted"])
    t, w_used = pure.draw_timesteps(0, 5000, w, weighted)
    assert torch.equal(w_used, w) and abs(t.float().mean().item() - 499.5) < 15  # uniform t, weights unchanged


def test_importance_sampled_kl_weighs_every_term_once(tiny_model):
    """A constant 0.1 offset on every output gives 0.01 at every t: with importance sampling the KL is exactly 0.01
    whatever t was drawn, where the weighted estimator gives mean_b w(t_b) * 0.01."""
    args = pure.parse_args(["--beta", "10", "--kl_t_sampling", "importance"])
    unet = common.trainable_unet(tiny_model)
    with torch.no_grad():
        unet.conv_out.bias.add_(0.1)
    x = torch.randn(8, *tiny_model.latent_shape)
    c = common.encode_prompts(tiny_model, ["an image of a church"] * 4 + ["an image of a tench"] * 4)
    w = pure.kl_weights(tiny_model.scheduler, "true")
    torch.manual_seed(0)
    for phase in ["forget", "repair"]:
        _, stats = pure.pure_step(
            unet, tiny_model.unet, tiny_model.scheduler, phase, x[:4], c[:4], x[4:], c[4:], args, w
        )
        assert stats["kl"].item() == pytest.approx(0.01, rel=1e-3)


def test_forget_t_min_draws_only_the_forget_images_at_high_noise(tiny_model, monkeypatch):
    args = pure.parse_args(["--forget_t_min", "990", "--beta", "10"])
    unet = common.trainable_unet(tiny_model)
    x = torch.randn(16, *tiny_model.latent_shape)
    c = common.encode_prompts(tiny_model, ["an image of a church"] * 8 + ["an image of a tench"] * 8)
    weights = pure.kl_weights(tiny_model.scheduler, "true")
    seen, add_noise = [], tiny_model.scheduler.add_noise
    monkeypatch.setattr(
        tiny_model.scheduler, "add_noise", lambda x0, e, t: seen.append(t.clone()) or add_noise(x0, e, t)
    )
    torch.manual_seed(0)
    for phase in ["forget", "repair"]:
        pure.pure_step(unet, tiny_model.unet, tiny_model.scheduler, phase, x[:8], c[:8], x[8:], c[8:], args, weights)
    forget_t, repair_t = seen
    assert (forget_t[:8] >= 990).all()  # the forget images
    assert (forget_t[8:] < 990).any() and (repair_t < 990).any()  # retain images: all t (8 draws above 990: 1e-16)
    with pytest.raises(SystemExit):
        pure.parse_args(["--forget_t_min", "1000"])
