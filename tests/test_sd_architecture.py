"""Stable Diffusion's real architecture on the CPU (benchmark/sd_architecture.py): its configs are SD-1.x's, and every
script runs its SD path (the "sd" world's defaults: gradient checkpointing, LoRA for rl_critic, SD learning rates) in
bf16 on a narrow copy of that architecture."""

import json
import math
import os
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import sd_architecture  # noqa: E402


def test_full_configs_have_stable_diffusion_1s_parameter_counts():
    """SD-1.4's published component sizes: UNet 859,520,964, VAE 83,653,863, CLIP ViT-L/14 text encoder 123,060,480."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sd_architecture.unet_config("full"))
        vae = AutoencoderKL(**sd_architecture.vae_config("full"))
        text = CLIPTextModel(CLIPTextConfig(**sd_architecture.text_config("full")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)
    assert unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 512


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    return sd_architecture.build(str(tmp_path_factory.mktemp("sd_arch")), scale="reduced")


def test_every_script_trains_on_the_sd_architecture_in_bf16(reduced):
    scripts = sd_architecture.SCRIPTS
    overrides = {s: sd_architecture.overrides_for(s, 2, None) for s in scripts}
    rows = sd_architecture.measure(reduced, scripts, 1, "cpu", os.path.join(reduced, "runs"), overrides)
    assert [r.get("error") for r in rows] == [None] * len(scripts)
    for r in rows:
        record = json.load(open(os.path.join(reduced, "runs", r["script"], "args.json")))
        assert record["world"] == "sd" and record["args"]["dtype"] == "bf16"
        assert record["args"]["gradient_checkpointing"] is True and r["peak_memory_mb"] > 0 and r["last_step_s"] > 0
    rl = next(r for r in rows if r["script"] == "rl_critic")
    assert rl["train_params"] == "LoRA rank 4" and rl["logratio"] < 1e-3
    table = sd_architecture.table(rows, "cpu")
    assert table.count("\n") == 1 + len(scripts) and "--batch_size 2" in table


def test_attack_and_relearning_run_on_the_sd_architecture_in_bf16(reduced):
    """eval.py's --attack soft_prompt and --relearn on SD's structure (77-token text encoder, SD's schedule), bf16."""
    import attacks
    import common

    model = common.load_model(os.path.join(reduced, "sd"), device="cpu", dtype="bf16")
    assert model.world == "sd" and model.tokenizer.model_max_length == 77
    prompts = ["an image of a church"]
    x0 = attacks.target_latents(model, prompts, 1, seed=0)
    adv, _, losses = attacks.soft_prompt_attack(model, prompts, x0, steps=2, tokens=5)
    assert adv.shape == (5, 64) and adv.dtype == torch.float32 and all(map(math.isfinite, losses))
    scores, losses = attacks.relearn(model, prompts, x0, [1], attacks.RELEARN_LR["sd"], score=lambda s, u: u.dtype)
    assert scores == {1: torch.float32} and math.isfinite(losses[0])
