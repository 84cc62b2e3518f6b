"""Stable Diffusion's real architecture, with random weights, on this machine: does each script's SD path run, and what
does a training step cost?

`build` writes diffusers folders with SD-1.x's true configs (nothing is downloaded): the UNet (320/640/1280/1280,
2 layers per block, cross-attention 768, 8 heads), the VAE (128/256/512/512, 512 px images, 4x64x64 latents), a text
encoder of CLIP ViT-L/14's size (12 layers, width 768, 77 tokens, vocabulary 49408; tokenised by the tiny world's
tokenizer, whose ids are a subset), SD's noise schedule, and for rl_critic's reward a CLIP ViT-L/14-sized CLIPModel.
`--scale reduced` writes the same block structure at a fraction of the width (the default tests run it in seconds).

`run` trains every script for a few steps with its Stable Diffusion defaults (batch, trained parameters, LoRA,
gradient checkpointing, learning rate, sampling steps) in `--dtype bf16`, each in its own process, and reports peak
memory (resident set size on the CPU; torch.cuda.max_memory_allocated on CUDA) and the time of the last training step.
Only what surrounds the training steps is made small, and the table says so: 2 cached images per set (pure, fdiv),
1 DDIM step to make them, no samples.png grid and no sampling-speed measurement (sfd) at the end.

    python benchmark/sd_architecture.py build runs/sd_arch                  # ~4.5 GB of fp32 safetensors
    python benchmark/sd_architecture.py run runs/sd_arch --steps 2          # the table (markdown) on stdout
    python benchmark/sd_architecture.py run runs/sd_arch --scripts pure fdiv --device cuda
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402

SCRIPTS = ["pure", "fdiv", "sfd", "rl_critic"]
# What each run shrinks around its training steps (not the steps themselves): the cached sets of pure/fdiv, and for
# rl_critic nothing (its rollouts are part of the step).
SMALL = {
    "pure": ["--num_forget_samples", "2", "--num_retain_samples", "2", "--gen_steps", "1"],
    "fdiv": ["--num_anchor_samples", "2", "--gen_steps", "1"],
    "sfd": [],
    "rl_critic": [],
}


def unet_config(scale: str) -> dict:
    """SD-1.x's UNet2DConditionModel config (CompVis/stable-diffusion-v1-4, unet/config.json), or a narrow copy."""
    width = (320, 640, 1280, 1280) if scale == "full" else (32, 32, 64, 64)
    return dict(
        sample_size=64 if scale == "full" else 32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=width,
        layers_per_block=2,
        cross_attention_dim=768 if scale == "full" else 64,
        attention_head_dim=8 if scale == "full" else 1,  # heads (diffusers' legacy name): 8 of width 40 in SD
        norm_num_groups=32 if scale == "full" else 8,
        downsample_padding=1,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        norm_eps=1e-5,
        center_input_sample=False,
        mid_block_scale_factor=1,
    )


def vae_config(scale: str) -> dict:
    """SD-1.x's AutoencoderKL config (vae/config.json): 4 blocks, so images are 8x the latents' side."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512) if scale == "full" else (8, 8, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32 if scale == "full" else 8,
        sample_size=512 if scale == "full" else 256,
        scaling_factor=0.18215,
    )


def text_config(scale: str) -> dict:
    """CLIP ViT-L/14's text tower (SD-1.x's text_encoder/config.json), or a narrow copy."""
    full = scale == "full"
    return dict(
        vocab_size=49408,
        hidden_size=768 if full else 64,
        intermediate_size=3072 if full else 128,
        num_hidden_layers=12 if full else 2,
        num_attention_heads=12 if full else 4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768 if full else 64,
    )


def vision_config(scale: str) -> dict:
    """CLIP ViT-L/14's vision tower (openai/clip-vit-large-patch14), or a narrow copy."""
    full = scale == "full"
    return dict(
        hidden_size=1024 if full else 64,
        intermediate_size=4096 if full else 128,
        num_hidden_layers=24 if full else 2,
        num_attention_heads=16 if full else 4,
        image_size=224 if full else 32,
        patch_size=14 if full else 8,
        hidden_act="quick_gelu",
        projection_dim=768 if full else 64,
    )


def build(folder: str, scale: str = "full", seed: int = 0) -> str:
    """Write `folder`/sd (a diffusers StableDiffusionPipeline folder) and `folder`/clip (a CLIPModel, processor),
    random weights from `seed`, fp32 safetensors. Returns `folder`."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
    )

    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(common.TINY, subfolder="tokenizer", model_max_length=77)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**vae_config(scale)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_config(scale))),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet_config(scale)),
        scheduler=DDPMScheduler.from_pretrained(common.TINY, subfolder="scheduler"),  # SD's schedule (data/README.md)
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(os.path.join(folder, "sd"), safe_serialization=True)
    clip = CLIPModel(CLIPConfig(text_config=text_config(scale), vision_config=vision_config(scale)))
    clip.save_pretrained(os.path.join(folder, "clip"), safe_serialization=True)
    size = vision_config(scale)["image_size"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(os.path.join(folder, "clip"))
    return folder


def train_one(script: str, folder: str, out: str, steps: int, device: str, overrides: list[str]) -> None:
    """In this process: `script`'s main on the SD-architecture folder with its SD defaults in bf16 (but `overrides`),
    for `steps` steps, without what surrounds training (samples.png, sfd's sampling-speed measurement; see SMALL)."""
    import importlib

    module = importlib.import_module(script)
    common.sample_grid = lambda *a, **k: None  # the before/after grid: 32 images at 512 px, not part of a step
    if script == "sfd":
        module.seconds_per_image = lambda *a, **k: 1.0  # 25-step sampling of 16 images, not part of a step
    if script == "rl_critic":  # the SD reward (CLIP ViT-L/14) from the local random-weight folder, not the hub
        module.REWARD_MODELS["sd"] = os.path.join(folder, "clip")
    argv = ["--model", os.path.join(folder, "sd"), "--dtype", "bf16", "--device", device, "--steps", str(steps)]
    argv += ["--out_dir", out, "--log_every", "1", "--save_every", "0"] + SMALL[script]
    if script == "rl_critic":
        argv += ["--critic_warmup", "0"]  # the first iteration updates the policy, as every later one does
    module.main(module.parse_args(argv + overrides))


def overrides_for(script: str, batch_size: int | None, train_params: str | None) -> list[str]:
    """Flags for a machine smaller than the SD defaults need (each shows in the table)."""
    out = []
    if batch_size is not None:
        out += ["--batch_size", str(max(batch_size, 2) if script == "rl_critic" else batch_size)]  # 1 forget + 1 retain
    if train_params is not None and script != "rl_critic":  # rl_critic trains LoRA adapters on SD
        out += ["--train_params", train_params]
    return out


def measure(folder: str, scripts: list, steps: int, device: str, out_root: str, overrides: dict) -> list[dict]:
    rows = []
    for script in scripts:
        out = os.path.join(out_root, script)
        if os.path.exists(out):
            import shutil

            shutil.rmtree(out)
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "_train", folder, script, out, str(steps), device, *overrides[script]]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            rows.append(dict(script=script, error=(proc.stderr.strip().splitlines() or ["?"])[-1], wall=wall))
            continue
        summary = json.load(open(os.path.join(out, "summary.json")))
        lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if x.strip()]
        args = json.load(open(os.path.join(out, "args.json")))["args"]
        rows.append(
            dict(
                script=script,
                peak_memory_mb=summary["peak_memory_mb"],
                last_step_s=lines[-1]["sec_per_step"],
                steps=len(lines),
                wall=wall,
                batch=args["batch_size"],
                train_params=f"LoRA rank {args['lora_rank']}" if args.get("lora_rank") else args.get("train_params"),
                overrides=" ".join(overrides[script]),
                lr=args["lr"],
                logratio=lines[-1].get("logratio_before_update"),
            )
        )
    return rows


def table(rows: list[dict], device: str) -> str:
    out = [
        "| script | batch, trained parameters, lr | not the SD default | peak memory (GB) | last step (s) | device |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['script']} | - | - | failed: {r['error']} | - | {device} |")
            continue
        out.append(
            f"| {r['script']} | {r['batch']}, {r['train_params']}, {r['lr']:g} | {r['overrides'] or '-'} | "
            f"{r['peak_memory_mb'] / 1024:.1f} | {r['last_step_s']:.1f} | {device} |"
        )
    return "\n".join(out)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "_train":  # a child process of `run`
        folder, script, out, steps, device = sys.argv[2:7]
        return train_one(script, folder, out, int(steps), device, sys.argv[7:])
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["build", "run"], help="build the folders, or train every script on them")
    p.add_argument("folder", help="where the folders are (build writes FOLDER/sd and FOLDER/clip)")
    p.add_argument("--scale", choices=["full", "reduced"], default="full", help="SD-1.x's sizes, or a narrow copy")
    p.add_argument("--scripts", nargs="+", choices=SCRIPTS, default=SCRIPTS, help="which scripts to train")
    p.add_argument("--steps", type=int, default=2, help="training steps (iterations) per script; the last is timed")
    p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda")
    p.add_argument(
        "--batch_size", type=int, default=None, help="instead of each script's SD batch (a machine too small for it)"
    )
    p.add_argument("--train_params", default=None, help="instead of pure/fdiv/sfd's SD parameter selection")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.command == "build":
        build(args.folder, args.scale)
        print(f"wrote {args.folder}/sd and {args.folder}/clip ({args.scale} scale, random weights)")
        return
    if not os.path.isfile(os.path.join(args.folder, "sd", "model_index.json")):
        raise common.UsageError(f"{args.folder!r} has no sd/model_index.json: run `build {args.folder}` first")
    device = str(common.resolve_device(args.device))
    overrides = {s: overrides_for(s, args.batch_size, args.train_params) for s in args.scripts}
    rows = measure(args.folder, args.scripts, args.steps, device, os.path.join(args.folder, "runs"), overrides)
    if args.json:
        common.save_json(args.json, rows)
    print(table(rows, device))
    return rows


if __name__ == "__main__":
    common.cli(main, None)
