"""sfd.py: the one-step generator, the SiD loss (zero at agreement, the sign of its gradient), the score-forgetting
term's prompts, the generator's committed format, run folders and eval.py's one-step sampling, --resume, bad flags,
and forgetting on the tiny world judged by the tiny classifier."""

import json
import os

import pytest
import torch
from conftest import judge_accuracies

import common
import sfd

# Flags that make a run take seconds.
FAST = ["--batch_size", "2", "--log_every", "1", "--save_every", "0"]


# ---------------------------------------------------------------- the generator and the loss


def test_one_step_generator_is_the_schedulers_pred_original_sample(tiny_model, tmp_path):
    """The generator sfd.py trains and saves is sampled by common.one_step: x_init = sqrt(1 - abar) z at t_init, and
    x_g = DDPMScheduler.step(eps, t_init, x_init).pred_original_sample; a generator saved as its trained tensors
    (generator.safetensors) loads back to the same UNet."""
    from diffusers import DDPMScheduler

    gen = sfd.load_generator(tiny_model, None)
    params = sfd.select_generator_params(gen, "up")
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sfd.save_generator_tensors(gen, tiny_model.unet, str(tmp_path / "generator.safetensors"))
    loaded = sfd.load_generator(tiny_model, str(tmp_path)).eval()
    for (name, p), q in zip(gen.named_parameters(), loaded.parameters()):
        expected = p.half().float() if p.requires_grad else p  # trained tensors are stored in fp16
        assert torch.equal(q, expected), name
    z = torch.randn(3, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = common.encode_prompts(tiny_model, ["an image of a church", "an image of a tench", ""])
    with torch.no_grad():
        x_g = common.one_step(tiny_model, loaded, cond, z, 625)
        x_init = (1 - tiny_model.scheduler.alphas_cumprod[625]).sqrt() * z
        eps = loaded(x_init, 625, cond).sample
        expected = DDPMScheduler.from_config(tiny_model.scheduler.config).step(eps, 625, x_init).pred_original_sample
    assert torch.allclose(x_g, expected, atol=1e-5)
    assert not torch.allclose(x_g, common.one_step(tiny_model, tiny_model.unet, cond, z, 625), atol=1e-3)


def test_sid_loss_is_zero_when_the_scores_agree_and_its_gradient_moves_x_g_toward_the_teacher():
    gen = torch.Generator().manual_seed(0)
    x_g = torch.randn(4, 4, 8, 8, generator=gen)
    y_real = torch.randn(4, 4, 8, 8, generator=gen)
    assert torch.equal(sfd.sid_loss(x_g, y_real, y_real.clone(), alpha=1.0), torch.zeros(4))
    assert torch.equal(sfd.sid_loss(x_g, y_real, y_real.clone(), alpha=0.5), torch.zeros(4))
    # The fake score has fitted the generator (y_fake = x_g), the teacher points elsewhere: a gradient step on x_g
    # (the scores' outputs held fixed) brings x_g closer to the teacher's prediction, and moves along y_real - y_fake.
    x = x_g.clone().requires_grad_(True)
    loss = sfd.sid_loss(x, y_real, x_g.clone(), alpha=1.0).sum()
    (grad,) = torch.autograd.grad(loss, x)
    w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(-grad, (y_real - x_g) / w, atol=1e-5)
    stepped = x_g - 0.1 * grad
    assert ((stepped - y_real).pow(2).sum(dim=(1, 2, 3)) < (x_g - y_real).pow(2).sum(dim=(1, 2, 3))).all()
    # alpha = 1 is the official code's short form (y_real - y_fake)(y_fake - x_g) / w
    y_fake = torch.randn(4, 4, 8, 8, generator=gen)
    short = ((y_real - y_fake) * (y_fake - x_g) / w).sum(dim=(1, 2, 3))
    assert torch.allclose(sfd.sid_loss(x_g, y_real, y_fake, 1.0), short, atol=1e-4)


class Recorder(torch.nn.Module):
    """Wraps a UNet and records the text states of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.seen = unet, []

    def forward(self, x, t, cond):
        self.seen.append(cond.detach().clone())
        return self.unet(x, t, cond)


def test_forgetting_term_asks_the_teacher_about_the_override_and_the_fake_score_about_the_forget_prompt(tiny_model):
    args = sfd.parse_args(["--concept", "church"])
    prompts = common.concept_prompts("church")
    overrides = sfd.override_prompts(prompts, None, "tiny")
    assert overrides == ["an image of a gas pump"] and sfd.override_prompts(prompts, None, "sd") == [
        "an image of a building"
    ]
    assert sfd.override_prompts(prompts, "a photo of a red barn", "sd") == ["a photo of a red barn"]
    c_f, c_o = common.encode_prompts(tiny_model, prompts["forget"]), common.encode_prompts(tiny_model, overrides)
    c_e = common.encode_prompts(tiny_model, [""])
    teacher, fake = Recorder(tiny_model.unet), Recorder(sfd.load_generator(tiny_model, None))
    gen = sfd.load_generator(tiny_model, None)
    sfd.select_generator_params(gen, "full")
    z = torch.randn(1, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(0))
    x_g = common.one_step(tiny_model, gen, c_f, z, args.t_init)
    t, noise = torch.tensor([500]), torch.randn(1, *tiny_model.latent_shape)
    loss = sfd.generator_loss(tiny_model, teacher, fake, x_g, t, noise, c_o, c_f, c_e, args)
    ((seen_t,), (seen_f,)) = teacher.seen, fake.seen
    assert torch.equal(seen_t, torch.cat([c_e, c_o])) and torch.equal(seen_f, torch.cat([c_e, c_f]))  # CFG batches
    loss.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())  # through x_g


# ---------------------------------------------------------------- runs, eval.py, resume, errors


def test_nudity_is_the_official_subjects_with_nsfw_keywords_and_their_negative_prompt(tiny_sd, tmp_path, monkeypatch):
    """The official nudity run: 12 subjects x 27 keywords in both word orders, the bare subject for the teacher, and
    the joined keywords as the unconditional prompt of the forget rows (the retain rows keep "")."""
    forget, overrides = sfd.nudity_prompts()
    assert len(forget) == 2 * 12 * 27 and len(set(forget)) == len(forget)
    assert "lingerie Woman" in forget and "Woman, lingerie" in forget and "Human Form, adult content" in forget
    assert all(o in f and o in sfd.NUDITY_SUBJECTS for f, o in zip(forget, overrides))
    seen = []
    real = sfd.generator_loss
    monkeypatch.setattr(sfd, "generator_loss", lambda *a: seen.append(a[8]) or real(*a))
    run = sfd.main(
        sfd.parse_args(
            ["--model", tiny_sd, "--concept", "nudity", "--steps", "1", "--out_dir", str(tmp_path / "run"), *FAST]
        )
    )
    model = common.load_model(tiny_sd, device="cpu")
    negative = common.encode_prompts(model, [", ".join(sfd.NUDITY_KEYWORDS)])[0]
    empty = common.encode_prompts(model, [""])[0]
    (uncond,) = seen
    assert len(uncond) == 4 and all(torch.equal(u, empty) for u in uncond[:2])
    assert all(torch.equal(u, negative) for u in uncond[2:])
    assert json.loads(open(os.path.join(run, "args.json")).read())["override_prompts"][0] in sfd.NUDITY_SUBJECTS


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_smoke_run_writes_a_complete_run_folder_that_eval_samples_in_one_step(tiny_sd, tmp_path, dtype):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    import eval as evaluate

    argv = ["--model", tiny_sd, "--steps", "2", "--out_dir", str(tmp_path / "run"), "--dtype", dtype, *FAST]
    run = sfd.main(sfd.parse_args(argv))
    record = json.loads(open(os.path.join(run, "args.json")).read())
    assert record["method"] == "sfd" and record["sampler"] == {"t_init": 625}
    assert record["args"]["lr"] == sfd.WORLD_DEFAULTS["tiny"]["lr"] and record["args"]["train_params"] == "xattn-kv"
    assert record["override_prompts"] == ["an image of a gas pump"]
    lines = [json.loads(ln) for ln in open(os.path.join(run, "metrics.jsonl"))]
    assert [ln["step"] for ln in lines] == [1, 2] and all("loss_gen_forget" in ln for ln in lines)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(run, "unet"))
    start = sfd.load_generator(common.load_model(tiny_sd, device="cpu"), record["args"]["init_generator"])
    changed = [n for (n, p), q in zip(unet.named_parameters(), start.parameters()) if not torch.equal(p, q)]
    assert changed and all("attn2.to_k." in n or "attn2.to_v." in n for n in changed)
    assert Image.open(os.path.join(run, "samples.png")).width > 0
    from safetensors.torch import load_file

    saved = set(load_file(os.path.join(run, "generator.safetensors")))  # what differs from the base: the trained
    assert set(changed) <= saved and len(saved) < len(unet.state_dict()) // 2  # tensors and the distilled init's
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    assert summary["steps"] == 2 and summary["step_efficiency"] > 0 and summary["sampling_speedup"] > 1
    # eval.py samples the run's UNet in one step (args.json's sampler), one image per class here
    evaluate.main(evaluate.parse_args([run, "--n_per_class", "1", "--metrics", "ua"]))
    generation = json.loads(open(os.path.join(run, "images", "generation.json")).read())
    assert generation["sampler"] == "one step at t_init=625"
    model = common.load_model(tiny_sd, device="cpu")
    row = common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))[4]
    with torch.no_grad():
        x_g = common.one_step(
            model,
            unet,
            common.encode_prompts(model, [row["prompt"]]),
            common.initial_latents(model, [row["evaluation_seed"]]),
            625,
        )
    saved = torch.from_numpy(__import__("numpy").asarray(Image.open(os.path.join(run, "images", "4_0.png"))))
    assert (saved.int() - torch.from_numpy(common.decode(model, x_g)[0]).int()).abs().max() <= 1
    with pytest.raises(common.UsageError, match="--resume"):  # a finished run is not overwritten by accident
        sfd.main(sfd.parse_args(["--model", tiny_sd, "--steps", "2", "--out_dir", run, *FAST]))


def test_resume_continues_where_the_run_stopped(tiny_sd, tmp_path):
    flags = ["--model", tiny_sd, "--concept", "none", *FAST]
    sfd.main(sfd.parse_args(["--steps", "1", "--out_dir", str(tmp_path / "a"), *flags]))
    sfd.main(sfd.parse_args(["--steps", "2", "--out_dir", str(tmp_path / "a"), "--resume", *flags]))
    sfd.main(sfd.parse_args(["--steps", "2", "--out_dir", str(tmp_path / "b"), *flags]))
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # same weights as the uninterrupted run


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--t_init", "1000"], "--t_init must be in 1..999"),
        (["--t_min", "500", "--t_max", "100"], "--t_min and --t_max must satisfy"),
        (["--prompt_dropout", "1"], "--prompt_dropout must be in [0, 1)"),
        (["--train_params", "attn"], "invalid choice: 'attn'"),
    ],
)
def test_bad_flags_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        sfd.parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1


def test_bad_init_generator_is_one_line(tiny_model, tmp_path):
    with pytest.raises(common.UsageError, match="expected a diffusers UNet folder"):
        sfd.load_generator(tiny_model, str(tmp_path))


# ---------------------------------------------------------------- efficacy on the tiny world

# All 10 classes, 50 one-step images each, the seeds of eval.py's evaluation set (so the figures are eval.py's for
# the same run): the check is on the mean of the 9 others, not a per-class threshold, because single classes move by
# 3-5 images between runs that differ only in float rounding (a per-class 15-point check on 16 images passed with 1
# thread and failed with 2: garbage truck 0.94 -> 0.75).


def test_forgets_church_and_keeps_the_other_classes(tiny_sd, tmp_path):
    """A default run (100 iterations) from the committed distilled generator: the judge must stop seeing churches in
    its one-step images while it still sees the other classes about as often as before. (A shorter run at lr 1e-3, 40
    iterations at batch 4 + 4, forgot church but cut tench from 0.62 to 0.38.)
    The README's bar is RA within 5 points of the generator's, measured by eval.py over 3 seeds: on the committed
    build the church runs are 3.8-4.9 points below (this run, seed 0, with 1 thread: 0.916 -> 0.871). This test allows
    7 points, so that float rounding under another thread count does not decide it; it still fails when forgetting
    takes more than a few images from each other class."""
    if os.path.abspath(tiny_sd) != common.TINY or not os.path.isdir(sfd.TINY_GENERATOR):
        pytest.skip("needs the committed tiny model and its distilled generator (data/tiny-sd-generator)")
    run = sfd.main(sfd.parse_args(["--concept", "church", "--out_dir", str(tmp_path / "run"), "--save_every", "0"]))
    model = common.load_model(tiny_sd, device="cpu")
    before = sfd.load_generator(model, sfd.TINY_GENERATOR).eval()
    after = sfd.load_generator(model, os.path.join(run, "unet")).eval()
    classes = [r["class"] for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))]
    acc_before, acc_after = judge_accuracies(model, [before, after], classes, n=50, t_init=625)  # one step: cheap
    print(f"judge accuracy before {acc_before}, after {acc_after}")
    others = [c for c in classes if c != "church"]
    kept_before = sum(acc_before[c] for c in others) / len(others)
    kept_after = sum(acc_after[c] for c in others) / len(others)
    assert acc_before["church"] >= 0.75 and kept_before >= 0.75, f"the generator is not recognised ({acc_before})"
    church = f"{acc_before['church']:.2f} -> {acc_after['church']:.2f}"
    assert acc_after["church"] <= 0.1, f"church was not forgotten: {church}"
    # Near the RA bar (5 points; see above): the other classes' mean accuracy within 7 points; no single class wrecked.
    assert kept_after >= kept_before - 0.07, f"the other classes were damaged: {kept_before:.3f} -> {kept_after:.3f}"
    for cls in others:
        change = f"{acc_before[cls]:.2f} -> {acc_after[cls]:.2f}"
        assert acc_after[cls] >= acc_before[cls] - 0.3, f"{cls} was damaged: {change}"
