"""common.py: loading, the sampler against diffusers, the DDIM log-probability, generation, run folders."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import common

# ---------------------------------------------------------------- loading


def test_loads_a_save_pretrained_folder_frozen(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    StableDiffusionPipeline.from_pretrained(tiny_sd).save_pretrained(tmp_path / "copy")
    m = common.load_model(str(tmp_path / "copy"), device="cpu")
    assert m.world == "tiny" and m.resolution == 32 and m.latent_shape == (4, 8, 8)
    for module in (m.unet, m.vae, m.text_encoder):
        assert not module.training and not any(p.requires_grad for p in module.parameters())
    # a trained UNet folder replaces the model's own
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    common.save_unet(unet, str(tmp_path / "run" / "unet"))
    m2 = common.load_model(str(tmp_path / "copy"), device="cpu", unet_path=str(tmp_path / "run" / "unet"))
    assert torch.equal(m2.unet.conv_out.bias, m.unet.conv_out.bias + 1.0)


def test_tiny_alias(tiny_sd):
    if os.path.abspath(tiny_sd) != common.TINY:
        pytest.skip("checks the committed model")
    assert common.load_model("tiny", device="cpu").world == "tiny"


def test_load_errors_are_one_clear_line(tmp_path):
    with pytest.raises(common.UsageError, match="does not exist.*--model tiny"):
        common.load_model(str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{}")
    with pytest.raises(common.UsageError, match="has no 'unet'"):
        common.load_model(str(tmp_path / "broken"), device="cpu")
    # hub ids are real code; offline (HF_HUB_OFFLINE=1) an uncached id fails with the ways out named
    with pytest.raises(common.UsageError, match="could not load model 'nobody/no-such-model'.*--model tiny"):
        common.load_model("nobody/no-such-model", device="cpu")
    with pytest.raises(common.UsageError, match="unknown --dtype 'fp8'"):
        common.resolve_dtype("fp8", torch.device("cpu"))


# ---------------------------------------------------------------- the denoising step and the sampler


def test_sampler_equals_stable_diffusion_pipeline(tiny_sd, tiny_model):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    prompts, seeds = ["an image of a church", "a photo of a tench", "a sketch of a golf ball"], [3, 4, 5]
    ours = common.decode(
        tiny_model,
        common.sample(
            tiny_model,
            common.encode_prompts(tiny_model, prompts),
            common.initial_latents(tiny_model, seeds),
            steps=10,
            guidance=7.5,
        ),
    )
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        prompts,
        num_inference_steps=10,
        guidance_scale=7.5,
        output_type="np",
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images
    assert np.array_equal(ours, (ref * 255).round().astype(np.uint8))


def test_ddim_step_matches_diffusers_and_its_log_prob_is_the_gaussian_density(tiny_model):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(tiny_model.scheduler.config)
    sched.set_timesteps(10)
    x, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in [int(sched.timesteps[0]), int(sched.timesteps[5]), int(sched.timesteps[-1])]:
        det, lp = common.ddim_step(tiny_model.scheduler, eps, t, x, steps=10)
        assert lp is None and torch.equal(det, sched.step(eps, t, x, eta=0.0).prev_sample)
        eta = 0.7
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        ours, logp = common.ddim_step(tiny_model.scheduler, eps, t, x, steps=10, eta=eta, generator=g1)
        assert torch.allclose(ours, sched.step(eps, t, x, eta=eta, generator=g2).prev_sample, atol=1e-6)
        # independent density: mean from diffusers with zero noise, std from the scheduler's own variance
        mean = sched.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        std = eta * sched._get_variance(t, t - 100) ** 0.5
        ref = torch.distributions.Normal(mean, std).log_prob(ours).sum(dim=(1, 2, 3))
        assert torch.allclose(logp, ref, rtol=1e-4, atol=1e-2)
        # re-scoring a stored step gives the same log-prob
        _, again = common.ddim_step(tiny_model.scheduler, eps, t, x, steps=10, eta=eta, prev=ours)
        assert torch.allclose(again, logp)


def test_ddim_step_is_fp32_for_a_bf16_eps_at_stable_diffusions_latent_size(tiny_model):
    """Under bf16 autocast the UNet's eps comes out bf16; the step must still be fp32 arithmetic (0-d fp32 tensors do
    not promote a bf16 tensor), so that a rollout's stored log-prob and the update's re-scoring of the same step agree:
    in bf16 they differed by ~20 nats at 4x64x64 (PPO ratios of e^20)."""
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 64, 64, generator=gen), torch.randn(2, 4, 64, 64, generator=gen)
    for t in common.ddim_timesteps(tiny_model.scheduler, 20)[::6]:
        g = torch.Generator().manual_seed(1)
        prev, logp = common.ddim_step(tiny_model.scheduler, eps.bfloat16(), t, x, 20, eta=1.0, generator=g)
        assert prev.dtype == torch.float32 and logp.dtype == torch.float32
        g = torch.Generator().manual_seed(1)
        prev32, logp32 = common.ddim_step(tiny_model.scheduler, eps.bfloat16().float(), t, x, 20, eta=1.0, generator=g)
        assert torch.equal(prev, prev32) and torch.equal(logp, logp32)  # the same as fp32 arithmetic on that eps
        _, again = common.ddim_step(tiny_model.scheduler, eps.bfloat16().float(), t, x, 20, eta=1.0, prev=prev)
        assert (again - logp).abs().max() < 1e-3


def test_bf16_regime_on_the_cpu(tiny_sd, tmp_path):
    """--dtype bf16 on a CPU is the GPU user's regime: autocast is on, the frozen models are bf16, the trained UNet is
    fp32 loaded from disk (not upcast from bf16), and a saved unet/'s untouched tensors are the base's fp32 bits."""
    from safetensors.torch import load_file

    model = common.load_model(tiny_sd, device="cpu", dtype="bf16")
    assert model.unet.dtype == model.vae.dtype == model.text_encoder.dtype == torch.bfloat16
    layer = torch.nn.Linear(4, 4)
    with common.autocast(model.device, model.dtype):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16  # CPU autocast, as CUDA would
    with common.autocast(model.device, torch.float32):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    unet = common.trainable_unet(model)
    base = load_file(os.path.join(tiny_sd, "unet", "diffusion_pytorch_model.safetensors"))
    state = unet.state_dict()
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v.float()) for k, v in base.items())
    assert unet.training and all(p.requires_grad for p in unet.parameters())
    with torch.no_grad():
        unet.conv_out.bias.add_(1.0)
    common.save_unet(unet, str(tmp_path / "unet"))
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    differ = [k for k, v in base.items() if not torch.equal(saved[k], v.float())]
    assert differ == ["conv_out.bias"]
    # sampling under bf16: fp32 latents out, and the same images as fp32 sampling within bf16's precision
    cond = common.encode_prompts(model, ["an image of a church"] * 2)
    with torch.no_grad(), common.autocast(model.device, model.dtype):
        z = common.sample(model, cond, common.initial_latents(model, [0, 1]), steps=5)
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def test_trajectory_and_x0(tiny_model):
    cond = common.encode_prompts(tiny_model, ["an image of a church"] * 2)
    out = common.sample(
        tiny_model,
        cond,
        common.initial_latents(tiny_model, [0, 1]),
        steps=4,
        eta=1.0,
        generator=torch.Generator().manual_seed(0),
        return_trajectory=True,
    )
    assert out["latents"].shape == (5, 2, 4, 8, 8) and out["log_probs"].shape == (4, 2)
    assert out["timesteps"].tolist() == common.ddim_timesteps(tiny_model.scheduler, 4)
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    xt = tiny_model.scheduler.add_noise(x0, noise, t)
    assert torch.allclose(common.x0_from_eps(tiny_model.scheduler, xt, noise, t), x0, atol=1e-4)


def test_cfg_is_one_doubled_call_with_the_guidance_formula(tiny_model):
    unet = tiny_model.unet
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 500])
    c = common.encode_prompts(tiny_model, ["an image of a church", "a photo of a tench"])
    u = common.encode_prompts(tiny_model, ["", ""])
    with torch.no_grad():
        e_c, e_u = unet(x, t, c).sample, unet(x, t, u).sample
        got = common.cfg_eps(unet, x, t, c, u, 7.5)
    assert torch.allclose(got, e_u + 7.5 * (e_c - e_u), atol=1e-4)


def test_prompt_cache_encodes_once(tiny_model):
    tiny_model.prompt_cache.clear()
    calls = []
    handle = tiny_model.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        a = common.encode_prompts(tiny_model, ["a photo of a church", "a photo of a church", "church"])
        b = common.encode_prompts(tiny_model, ["church", "a photo of a church"])
    finally:
        handle.remove()
    assert len(calls) == 1 and torch.equal(a[2], b[0])


# ---------------------------------------------------------------- generation

GEN_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import common
common.generate(common.load_model(sys.argv[1], device="cpu"), sys.argv[2], sys.argv[3], n_per_prompt=3, steps=3,
                batch_size=4, progress=False)
"""


def _pngs(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder)) if f.endswith(".png")}


def test_generate_two_torchrun_processes_write_the_same_files_and_resume(tiny_sd, tmp_path):
    prompts = tmp_path / "p.csv"
    prompts.write_text(
        "case_number,prompt,evaluation_seed,class\n"
        + "".join(
            f"{i},an image of a {c},{100 + i},{c}\n"
            for i, c in enumerate(["church", "tench", "golf ball", "parachute"])
        )
    )
    script = tmp_path / "gen.py"
    script.write_text(GEN_SCRIPT.format(root=ROOT))
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, str(script), tiny_sd, str(prompts), str(one)], check=True, env=env, capture_output=True
    )
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", str(script), tiny_sd, str(prompts), str(two)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = _pngs(one), _pngs(two)
    assert len(a) == 12 and a == b
    # a resumed run (some files lost, e.g. killed mid-way) completes to the same bytes
    for f in ["1_2.png", "3_0.png", "3_1.png"]:
        os.remove(two / f)
    subprocess.run(
        [sys.executable, str(script), tiny_sd, str(prompts), str(two)], check=True, env=env, capture_output=True
    )
    assert _pngs(two) == a
    rows = open(one / "prompts.csv").read().splitlines()
    assert rows[0] == "case_number,prompt,evaluation_seed,class" and len(rows) == 5


def test_generate_resumes_after_a_crash_and_refuses_mixed_settings(tiny_model, tmp_path, monkeypatch):
    prompts = str(tmp_path / "six.csv")  # six rows: two batches of 4
    common.write_prompts(prompts, common.read_prompts(os.path.join(ROOT, "data", "prompts", "imagenette.csv"))[:6])
    full = common.generate(
        tiny_model, prompts, str(tmp_path / "full"), n_per_prompt=1, steps=2, batch_size=4, progress=False
    )
    real_decode, calls = common.decode, []

    def crashing_decode(model, z):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while sampling the second batch
        return real_decode(model, z)

    monkeypatch.setattr(common, "decode", crashing_decode)
    with pytest.raises(KeyboardInterrupt):
        common.generate(
            tiny_model, prompts, str(tmp_path / "crash"), n_per_prompt=1, steps=2, batch_size=4, progress=False
        )
    assert len(_pngs(tmp_path / "crash")) == 4 and not [f for f in os.listdir(tmp_path / "crash") if "tmp" in f]
    monkeypatch.setattr(common, "decode", real_decode)
    common.generate(tiny_model, prompts, str(tmp_path / "crash"), n_per_prompt=1, steps=2, batch_size=4, progress=False)
    assert _pngs(tmp_path / "crash") == _pngs(full)
    with pytest.raises(common.UsageError, match="other settings.*steps"):
        common.generate(tiny_model, prompts, full, n_per_prompt=1, steps=3, batch_size=4, progress=False)


def test_prompt_files(tmp_path):
    rows = common.read_prompts(os.path.join(ROOT, "data", "prompts", "imagenette.csv"))
    assert [r["class"] for r in rows] == common.IMAGENETTE and all(isinstance(r["evaluation_seed"], int) for r in rows)
    i2p = tmp_path / "i2p.csv"  # I2P's variant: sd_seed instead of evaluation_seed, extra columns kept
    i2p.write_text("prompt,categories,sd_seed,case_number\na nude,sexual,42,7\n")
    assert (
        common.read_prompts(str(i2p))[0].items()
        >= {"evaluation_seed": 42, "case_number": 7, "categories": "sexual"}.items()
    )
    coco = tmp_path / "coco.csv"  # COCO captions: no case_number, no seed
    coco.write_text("caption\na dog\na cat\n")
    assert [(r["case_number"], r["evaluation_seed"]) for r in common.read_prompts(str(coco))] == [(0, 0), (1, 1)]
    bad = tmp_path / "bad.csv"
    bad.write_text("case_number,text_prompt\n0,x\n")
    with pytest.raises(common.UsageError, match="no 'prompt' column"):
        common.read_prompts(str(bad))


# ---------------------------------------------------------------- parameters, concepts, run folders


def test_parameter_selector(tiny_model):
    unet = common.trainable_unet(tiny_model)
    names = {n for n, _ in unet.named_parameters()}
    kv = common.select_params(unet, "xattn-kv")
    kv_names = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert kv_names and all(n.split(".")[-2] in ("to_k", "to_v") and ".attn2." in n for n in kv_names)
    assert kv_names == {n for n in names if ".attn2.to_k." in n or ".attn2.to_v." in n} and len(kv) == len(kv_names)
    assert len(common.select_params(unet, "full")) == len(names)
    nox = {n for n, p in unet.named_parameters() if p.requires_grad} if common.select_params(unet, "noxattn") else 0
    assert not any(".attn2." in n for n in nox) and any(".attn1." in n for n in nox)
    with pytest.raises(common.UsageError, match="matches no parameter"):
        common.select_params(torch.nn.Linear(2, 2), "xattn")
    with pytest.raises(common.UsageError, match="unknown parameter selection 'attn'"):
        common.select_params(unet, "attn")


def test_concept_prompts(tmp_path):
    c = common.concept_prompts("church")
    assert c["forget"] == ["an image of a church"] and len(c["retain"]) == 9 and "church" not in " ".join(c["retain"])
    assert common.concept_prompts("chain_saw")["concept"] == "chain saw"
    n = common.concept_prompts("nudity")
    assert len(n["forget"]) >= 10 and "a photo of a person wearing clothes" in n["retain"]
    with pytest.raises(common.UsageError, match="'van gogh'.*--retain_prompts"):
        common.concept_prompts("van gogh")
    retain = tmp_path / "retain.csv"
    retain.write_text("case_number,prompt\n0,a painting by Monet\n")
    free = common.concept_prompts("van gogh", retain_file=str(retain))
    assert "a painting of van gogh" in free["forget"] and free["retain"] == ["a painting by Monet"]


def test_run_folder_checkpoint_round_trip(tiny_model, tmp_path):
    import argparse

    args = argparse.Namespace(concept="church", seed=0, out_dir=str(tmp_path / "run"), resume=False, lr=1e-5)
    run = common.init_run(args, "test", tiny_model)
    record = json.load(open(os.path.join(run, "args.json")))
    assert record["args"]["lr"] == 1e-5 and record["base_model"] == "tiny" and "torch" in record["versions"]
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    for step in range(1, 4):
        net(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        common.log_metrics(run, step, {"loss": torch.tensor(float(step))})
        if step == 2:
            common.save_checkpoint(run, step, {"net": net}, {"opt": opt})
            saved = {k: v.clone() for k, v in net.state_dict().items()}
            saved_opt = opt.state_dict()["state"][0]["exp_avg"].clone()
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.1)
    state = common.load_checkpoint(run, {"net": net2}, {"opt": opt2})
    assert state["step"] == 2 and all(torch.equal(net2.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], saved_opt)
    assert [json.loads(ln)["step"] for ln in open(os.path.join(run, "metrics.jsonl"))] == [1, 2]
    extra = torch.nn.Linear(2, 2)  # a module the checkpoint does not hold: an error
    with pytest.raises(common.UsageError, match="has no 'extra' state; resume with the flags the run was started"):
        common.load_checkpoint(run, {"net": net2, "extra": extra}, {"opt": opt2})
    with pytest.raises(common.UsageError, match="nan at step 5"):
        common.check_finite(torch.tensor(float("nan")), 5)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def boom(f):
        f.write("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        common.atomic_write(str(tmp_path / "x.json"), boom)
    assert os.listdir(tmp_path) == []


def test_sample_grid(tiny_model, tmp_path):
    from PIL import Image

    common.sample_grid(
        tiny_model, [tiny_model.unet, tiny_model.unet], ["church", "tench"], str(tmp_path / "g.png"), n=2, steps=2
    )
    img = np.asarray(Image.open(tmp_path / "g.png"))
    # 2 prompts x 2 images of 32 px per UNet, a 4 px white separator, upscaled 4x: (256, 4 * (64 + 4 + 64), 3), below
    # the header of column labels and right of the prompts' margin
    grid = img[-256:, -528:]
    assert np.all(grid[:, 256:272] == 255)
    assert np.array_equal(grid[:, :256], grid[:, -256:])  # same UNet, same seeds: same images on both sides


def test_sample_grid_labels_its_columns_and_rows(tiny_model, tmp_path):
    """The grid grows by a header ("before" / "after") and a left margin with each row's prompt; both hold text (not
    only the white background)."""
    from PIL import Image

    args = (tiny_model, [tiny_model.unet, tiny_model.unet], ["an image of a church", "an image of a tench"])
    common.sample_grid(*args, str(tmp_path / "g.png"), n=2, steps=2)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    top, left = img.shape[0] - 256, img.shape[1] - 528  # the label areas around the (256, 528) image grid
    assert top > 0 and left > 0
    header, margin = img[:top, left:], img[top:, :left]
    assert (header < 128).any() and (margin < 128).any()  # dark text on white
    assert (img[:top, :left] == 255).all()  # the corner stays empty
    before, after = header[:, :256], header[:, -256:]  # each label above its own UNet's images
    assert (before < 128).any() and (after < 128).any() and not np.array_equal(before, after)


def test_one_step_generator_is_the_schedulers_pred_original_sample(tiny_model):
    """SFD/SiD one-step generation: x_init = sqrt(1 - abar) z, x_g = the scheduler's pred_original_sample at t_init."""
    from diffusers import DDPMScheduler

    z = torch.randn(3, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = common.encode_prompts(tiny_model, ["an image of a church", "a photo of a tench", ""])
    with torch.no_grad():
        x_g = common.one_step(tiny_model, tiny_model.unet, cond, z, 625)
        abar = tiny_model.scheduler.alphas_cumprod[625]
        x_init = (1 - abar).sqrt() * z
        eps = tiny_model.unet(x_init, 625, cond).sample
        ddpm = DDPMScheduler.from_config(tiny_model.scheduler.config)
        expected = ddpm.step(eps, 625, x_init).pred_original_sample
        assert torch.allclose(x_g, expected, atol=1e-5)
        assert torch.equal(common.sample(tiny_model, cond, z, steps=25, guidance=7.5, t_init=625), x_g)


def test_unet_pass_clock_times_between_steps_and_leaves_the_model_alone(tiny_model):
    unet = copy.deepcopy(tiny_model.unet).requires_grad_(True)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    clock = common.UNetPassClock(tiny_model, {"a": [(unet, 2, True)], "b": [(tiny_model.unet, 2, False)]}, 10, 5)
    assert clock.every == 2
    for step in range(10):
        clock.tick(step)
    assert [len(v) for v in clock.times.values()] == [5, 5]  # steps 0, 2, 4, 6, 8
    assert clock.seconds("a") == sum(clock.times["a"]) / 5 > 0
    assert all(p.grad is None for p in unet.parameters())  # the clock's backward leaves no gradient behind
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
    idle = common.UNetPassClock(tiny_model, {"a": [(unet, 1, False)]}, 0)  # no step ran: timed on demand
    assert idle.seconds("a") > 0 and len(idle.times["a"]) == 1
