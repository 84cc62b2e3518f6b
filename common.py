"""Shared plumbing for the method scripts and eval.py; no method's idea (a loss, a schedule, a critic) lives here.

Loading a model, prompt encoding, classifier-free guidance, the DDIM step and sampler, `generate` (a prompt file into
an image folder, identical under 1 or N torchrun processes), run folders (args.json, metrics.jsonl, atomic writes,
checkpoints for --resume, the trained UNet), ESD's parameter selector, concept -> prompts, step timing, sample grids."""

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from tqdm import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(ROOT, "data", "tiny-sd")
PROMPTS_DIR = os.path.join(ROOT, "data", "prompts")
SD_IDS = ["CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-5/stable-diffusion-v1-5"]
IMAGENET_INDEX = {  # the ten Imagenette classes and their ImageNet class indices
    "tench": 0, "English springer": 217, "cassette player": 482, "chain saw": 491, "church": 497, "French horn": 566,
    "garbage truck": 569, "gas pump": 571, "golf ball": 574, "parachute": 701,
}  # fmt: skip
IMAGENETTE = list(IMAGENET_INDEX)


class UsageError(Exception):
    """Bad input from the user: printed as one line, without a traceback, by `cli`."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: ...`, exit code 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def cli(main, args) -> None:
    """Run `main(args)`; a UsageError becomes `error: ...` on stderr and exit code 2."""
    try:
        main(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def resolve_device(device: str | None) -> torch.device:
    """`None`/"auto" -> CUDA (this process's LOCAL_RANK under torchrun) when available, else CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown --device {device!r}; accepted: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for CUDA but none is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """Dtype of the frozen models: "auto" = bf16 on CUDA, fp32 elsewhere (no fp16: it would need a GradScaler)."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if dtype not in dtypes:
        raise UsageError(f"unknown --dtype {dtype!r}; accepted: auto, {', '.join(dtypes)}")
    return dtypes[dtype]


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16 autocast for bf16 models, on CUDA and the CPU alike (a CPU run in bf16 is the GPU user's regime): matmuls
    and convolutions run in bf16 while trained weights stay fp32. A no-op for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass
class Model:
    """A loaded Stable Diffusion model: its diffusers components and where they came from."""

    path: str  # folder or hub id
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # the training (DDPM) scheduler, with the model's noise schedule
    device: torch.device
    dtype: torch.dtype
    unet_path: str | None = None  # the trained UNet folder loaded instead of the model's own, if any
    prompt_cache: dict = dataclasses.field(default_factory=dict)

    @property
    def resolution(self) -> int:
        """Image side in pixels (32 tiny, 512 SD)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def world(self) -> str:
        """Which judge, CLIP and defaults apply: "tiny" (32x32, wherever its folder lives) or "sd"."""
        return "tiny" if self.resolution < 256 else "sd"

    @property
    def latent_shape(self) -> tuple:
        return (self.unet.config.in_channels, self.unet.config.sample_size, self.unet.config.sample_size)


def is_tiny(path: str) -> bool:
    return os.path.isdir(path) and os.path.isdir(TINY) and os.path.samefile(path, TINY)


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and all(name.split("/")) and not name.startswith((".", "~")) and " " not in name


def _load_unet(path: str, unet_path: str | None, dtype: torch.dtype):
    """The UNet of the model at `path`, or the trained UNet folder `unet_path` when given."""
    from diffusers import UNet2DConditionModel

    if unet_path:
        return UNet2DConditionModel.from_pretrained(unet_path, torch_dtype=dtype)
    return UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)


def load_model(name: str = "tiny", device=None, dtype=None, unet_path: str | None = None) -> Model:
    """A Stable Diffusion model's components, frozen (eval mode, no gradients), on `device` in `dtype`. `name`: "tiny"
    (data/tiny-sd), a hub id (SD_IDS) or a diffusers folder; `unet_path`: a trained UNet folder to use instead."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
    path = TINY if name == "tiny" else name
    local = os.path.isdir(path)
    if not local and not looks_like_hub_id(path):
        hint = f"use --model tiny for the embedded model, or a hub id such as {SD_IDS[0]}"
        raise UsageError(f"model folder {path!r} does not exist; {hint}")
    for part in ["model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"]:
        if local and not os.path.exists(os.path.join(path, part)):
            not_sd = f"model folder {path!r} is not a diffusers Stable Diffusion folder"
            expected = "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
            raise UsageError(f"{not_sd}: it has no {part!r} (expected {expected})")
    if unet_path and not os.path.isfile(os.path.join(unet_path, "config.json")):
        raise UsageError(f"UNet folder {unet_path!r} has no config.json (expected a diffusers UNet folder)")
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)  # transformers' name
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)  # diffusers' name
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        unet = _load_unet(path, unet_path, dtype)
    except Exception as e:  # noqa: BLE001 -- hub and IO failures come as many types (OSError, ValueError, ImportError)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        offline = "network access once (then HF_HUB_OFFLINE=1 uses the cache)"
        hub_hint = f"; for a hub id you need {offline}, or use --model tiny for the embedded model"
        raise UsageError(f"could not load model {name!r}: {first}{'' if local else hub_hint}") from e
    for m in (unet, vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return Model(path, unet, vae, text_encoder, tokenizer, scheduler, device, dtype, unet_path)


def trainable_unet(model: Model, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """The model's UNet in fp32 (trained weights stay fp32 under autocast), in training mode with gradients. Beside
    bf16 frozen models it is loaded again from disk: upcasting the bf16 copy would round every weight to bf16."""
    if model.dtype == torch.float32:
        unet = copy.deepcopy(model.unet)
    else:
        unet = _load_unet(model.path, model.unet_path, torch.float32).to(model.device)
    unet.train().requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    return unet


def select_params(unet: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """ESD's parameter groups (Gandikota et al. 2023), by diffusers names; sets requires_grad accordingly. full: every
    parameter; xattn: cross-attention (attn2); xattn-kv: cross-attention to_k/to_v only (f-DMU's choice); noxattn:
    everything except cross-attention and the time embedding (ESD's choice for objects and nudity)."""
    rules = {
        "full": lambda n: True,
        "xattn": lambda n: "attn2." in n,
        "xattn-kv": lambda n: "attn2.to_k." in n or "attn2.to_v." in n,
        "noxattn": lambda n: "attn2." not in n and not n.startswith("time_embedding."),
    }
    if which not in rules:
        raise UsageError(f"unknown parameter selection {which!r}; accepted: {', '.join(rules)}")
    for name, p in unet.named_parameters():
        p.requires_grad_(rules[which](name))
    chosen = [p for p in unet.parameters() if p.requires_grad]
    if not chosen:
        raise UsageError(f"parameter selection {which!r} matches no parameter of this UNet")
    return chosen


@torch.no_grad()
def encode_prompts(model: Model, prompts: list[str]) -> torch.Tensor:
    """Text-encoder states (N, L, D) for prompts, as StableDiffusionPipeline computes them; cached per prompt."""
    missing = [p for p in dict.fromkeys(prompts) if p not in model.prompt_cache]
    if missing:
        tok = model.tokenizer
        ids = tok(missing, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        model.prompt_cache.update(zip(missing, model.text_encoder(ids.input_ids.to(model.device))[0]))
    return torch.stack([model.prompt_cache[p] for p in prompts])


def cfg_eps(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps("") + w (eps(c) - eps("")), one UNet call on the doubled batch. The UNet sees its
    own dtype (bf16 frozen, fp32 trained under autocast; the input's for a wrapper without .dtype); returns fp32."""
    dtype = getattr(unet, "dtype", x.dtype)
    if scale == 1.0:
        return unet(x.to(dtype), t, cond.to(dtype)).sample.float()
    t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim == 1 else t
    eps_u, eps_c = unet(torch.cat([x, x]).to(dtype), t2, torch.cat([uncond, cond]).to(dtype)).sample.float().chunk(2)
    return eps_u + scale * (eps_c - eps_u)


def x0_from_eps(scheduler, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), in fp32."""
    x_t, eps = x_t.float(), eps.float()
    abar = scheduler.alphas_cumprod.to(x_t.device)[torch.as_tensor(t, device=x_t.device)].float()
    abar = abar.reshape(-1, *([1] * (x_t.ndim - 1))) if abar.ndim else abar
    return (x_t - (1 - abar) ** 0.5 * eps) / abar**0.5


def ddim_timesteps(scheduler, steps: int) -> list[int]:
    """The timesteps DDIMScheduler.set_timesteps(steps) uses for this model's config ("leading" spacing + offset)."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    return ddim.timesteps.tolist()


def ddim_step(scheduler, eps: torch.Tensor, t: int, x_t: torch.Tensor, steps: int, eta=0.0, generator=None, prev=None):
    """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.step computes it. With
    eta > 0 the step is Gaussian N(mu, s^2 I), s = eta * sqrt((1-a_prev)/(1-a_t) (1 - a_t/a_prev)); it draws `prev`
    from `generator` unless `prev` is given (to re-score a stored step). Returns (x_prev, log_prob), the log-density
    summed over non-batch dims (DDPO's; None if eta = 0). In fp32 at least: 0-d fp32 tensors don't promote bf16 eps."""
    dt = torch.promote_types(torch.promote_types(eps.dtype, x_t.dtype), torch.float32)
    eps, x_t = eps.to(dt), x_t.to(dt)
    prev = prev.to(dt) if prev is not None else None
    acp = scheduler.alphas_cumprod.to(dt)
    t_prev = t - scheduler.config.num_train_timesteps // steps
    a_t = acp[t]
    final = torch.tensor(1.0) if scheduler.config.get("set_alpha_to_one", True) else acp[0]
    a_prev = acp[t_prev] if t_prev >= 0 else final
    b_t = 1 - a_t
    x0 = (x_t - b_t**0.5 * eps) / a_t**0.5
    variance = (1 - a_prev) / b_t * (1 - a_t / a_prev)
    std = eta * variance**0.5
    mean = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
    if eta == 0:
        return mean, None
    if prev is None:
        prev = mean + std * torch.randn(x_t.shape, generator=generator, device="cpu").to(x_t.device, dt)
    log_prob = -((prev.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return prev, log_prob.sum(dim=tuple(range(1, x_t.ndim)))


@torch.no_grad()
def initial_latents(model: Model, seeds: list[int]) -> torch.Tensor:
    """x_T for each seed, fp32, drawn on the CPU (device-independent) as the pipeline does with CPU generators."""
    z = [torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(z).to(model.device)


def sample(model: Model, cond: torch.Tensor, latents: torch.Tensor, steps=25, guidance=7.5, eta=0.0, unet=None,
           generator=None, return_trajectory=False, t_init=None):  # fmt: skip
    """DDIM sampling, in fp32, from x_T = `latents` under text states `cond` (N, L, D) with classifier-free guidance.
    Returns x_0 latents, or with `return_trajectory` a dict with `latents` (T+1, N, ...) x_T..x_0, `log_probs` (T, N)
    (eta > 0) and `timesteps` (T,). Gradients flow only if the caller enables them. With `t_init` the UNet is a
    one-step generator (SFD/SiD): `one_step` replaces the DDIM loop, and steps and guidance are not used."""
    unet = unet or model.unet
    if t_init is not None:
        return one_step(model, unet, cond, latents, t_init)
    uncond = encode_prompts(model, [""]).expand(len(cond), -1, -1)
    x = latents.float()
    traj, logps = [x], []
    timesteps = ddim_timesteps(model.scheduler, steps)
    for t in timesteps:
        eps = cfg_eps(unet, x, torch.full((len(x),), t, device=x.device), cond, uncond, guidance)
        x, logp = ddim_step(model.scheduler, eps, t, x, steps, eta, generator)
        if return_trajectory:
            traj.append(x)
            logps.append(logp)
    if not return_trajectory:
        return x
    log_probs = torch.stack(logps) if eta > 0 else None
    return dict(latents=torch.stack(traj), log_probs=log_probs, timesteps=torch.tensor(timesteps))


def one_step(model: Model, unet, cond: torch.Tensor, z: torch.Tensor, t_init: int) -> torch.Tensor:
    """One-step generation (SiD-LSG / SFD): x_init = sqrt(1 - abar_tinit) z (the scheduler's add_noise of x_0 = 0),
    x_g = the UNet's x0-prediction at t_init. No guidance: the generator was trained with guidance on its teacher."""
    t = torch.full((len(z),), int(t_init), device=z.device)
    x_init = model.scheduler.add_noise(torch.zeros_like(z), z, t)
    dtype = getattr(unet, "dtype", x_init.dtype)
    eps = unet(x_init.to(dtype), t, cond.to(dtype)).sample.float()
    return x0_from_eps(model.scheduler, x_init, eps, t)


@torch.no_grad()
def decode(model: Model, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 images (N, H, W, 3), as StableDiffusionPipeline's postprocessing."""
    x = model.vae.decode(latents.to(model.vae.dtype) / model.vae.config.scaling_factor).sample
    x = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return (x * 255).round().astype(np.uint8)


@torch.no_grad()
def encode_images(model: Model, images: np.ndarray, generator=None) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> scaled latents (a sample of the VAE posterior, as in SD training)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(model.device, model.vae.dtype) / 127.5 - 1
    return model.vae.encode(x).latent_dist.sample(generator) * model.vae.config.scaling_factor


def read_prompts(path: str) -> list[dict]:
    """Rows of a prompt file (`case_number,prompt,evaluation_seed[,class][,...]`; extra columns kept). Also accepted:
    `sd_seed` (I2P), `caption` or `text` for the prompt and no `case_number` (COCO); a missing seed = case_number."""
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path!r} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames or []
    if "prompt" not in columns:
        alt = next((c for c in ("caption", "text") if c in columns), None)
        if alt is None:
            raise UsageError(f"{path}: no 'prompt' column (found {columns}); required: ['case_number', 'prompt']")
        for r in rows:
            r["prompt"] = r[alt]
    out = []
    for i, r in enumerate(rows):
        column, value = "case_number", r.get("case_number", "") or i
        try:
            case = int(value)
            column, value = "evaluation_seed", r.get("evaluation_seed") or r.get("sd_seed") or case
            seed = int(float(value))
        except ValueError:
            raise UsageError(f"{path}: {column} {value!r} in row {i + 2} is not an integer") from None
        out.append({**r, "case_number": case, "evaluation_seed": seed, "prompt": r["prompt"] or ""})
    if not out:
        raise UsageError(f"prompt file {path!r} has no rows")
    cases = [r["case_number"] for r in out]
    if len(set(cases)) != len(cases):
        raise UsageError(f"{path}: case_number values are not unique")
    return out


def write_prompts(path: str, rows: list[dict]) -> None:
    """A prompt file of `rows`: case_number, prompt, evaluation_seed, then the rows' other columns."""
    columns = list(dict.fromkeys(["case_number", "prompt", "evaluation_seed", *(k for r in rows for k in r)]))

    def write(f):
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(path, write)


def atomic_write(path: str, write_fn, mode: str = "w") -> None:
    """Write through a temporary file in the same folder, then rename: a crash never leaves a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, mode, newline=None if "b" in mode else "") as f:
            write_fn(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_json(path: str, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2, default=str))


def save_png(path: str, image: Image.Image) -> None:
    atomic_write(path, lambda f: image.save(f, format="PNG"), mode="wb")


def dist_info() -> tuple[int, int]:
    """(rank, world size) of this process under torchrun / accelerate launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def generate(model: Model, prompt_file: str, out_dir: str, n_per_prompt=1, steps=25, guidance=7.5, batch_size=64,
             progress=True, t_init=None) -> str:  # fmt: skip
    """Images for every row of a prompt file into an image folder: `{case_number}_{k}.png` + `prompts.csv`. Image k
    of a row is sampled from seed `evaluation_seed + k` (deterministic DDIM; one step with `t_init`). The (row, k)
    pairs are cut into fixed batches of `batch_size`, batch j going to rank j mod N under torchrun: batched matmuls
    round differently for other batch compositions, so this makes 1 and N processes, and a resumed run, write
    bit-identical files. A batch whose files all exist is skipped, a partly written one sampled again for its missing
    files. `generation.json` records the settings; resuming with other settings is an error."""
    if n_per_prompt < 1 or steps < 1 or batch_size < 1:
        raise UsageError(f"n_per_prompt, steps and batch_size must be >= 1 (got {n_per_prompt}, {steps}, {batch_size})")
    rows = read_prompts(prompt_file)
    rank, world = dist_info()
    os.makedirs(out_dir, exist_ok=True)
    name = model.path if not is_tiny(model.path) else "tiny"
    sampler = "DDIM eta=0" if t_init is None else f"one step at t_init={t_init}"
    settings = dict(model=name, unet=model.unet_path, sampler=sampler, steps=steps, guidance=guidance)
    settings.update(n_per_prompt=n_per_prompt, batch_size=batch_size, resolution=model.resolution)
    settings.update(seed_rule="image k of a row uses seed evaluation_seed + k", source=os.path.abspath(prompt_file))
    settings_path = os.path.join(out_dir, "generation.json")
    if os.path.exists(settings_path):
        old = json.load(open(settings_path))
        diff = {k: (old.get(k), v) for k, v in settings.items() if k not in ("unet", "source") and old.get(k) != v}
        if diff:
            raise UsageError(f"{out_dir} holds images made with other settings {diff}; use a new folder")
    if rank == 0:
        save_json(settings_path, settings)
        write_prompts(os.path.join(out_dir, "prompts.csv"), rows)
    items = [(r, k, os.path.join(out_dir, f"{r['case_number']}_{k}.png")) for r in rows for k in range(n_per_prompt)]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)][rank::world]
    todo = [b for b in batches if not all(os.path.exists(path) for _, _, path in b)]
    desc = f"generate rank {rank}" if world > 1 else "generate"
    with tqdm(total=sum(len(b) for b in todo), desc=desc, disable=not progress) as bar:
        for chunk in todo:
            cond = encode_prompts(model, [r["prompt"] for r, _, _ in chunk])
            z_T = initial_latents(model, [r["evaluation_seed"] + k for r, k, _ in chunk])
            with torch.no_grad(), autocast(model.device, model.dtype):
                z = sample(model, cond, z_T, steps, guidance, t_init=t_init)
            for (_, _, path), img in zip(chunk, decode(model, z)):
                if not os.path.exists(path):
                    save_png(path, Image.fromarray(img))
            bar.update(len(chunk))
    if world > 1:  # every process's images are written before any process returns
        if not dist.is_initialized():
            dist.init_process_group("nccl" if model.device.type == "cuda" else "gloo")
        dist.barrier()
    return out_dir


def imagenette_class(concept: str) -> str | None:
    """The Imagenette class a concept names ("church", "chain_saw", "English springer"), or None."""
    key = concept.replace("_", " ").lower()
    return next((c for c in IMAGENETTE if c.lower() == key), None)


def concept_prompts(concept: str, retain_file: str | None = None) -> dict:
    """Forget and retain prompts for a concept: an Imagenette class forgets "an image of a {class}" and retains the
    other nine (data/prompts/imagenette.csv); "nudity" uses data/prompts/nudity.csv and nudity_retain.csv; other text
    forgets a few templates around it and needs `retain_file`, which replaces the default retain prompts in any case."""
    if not concept or not concept.strip():
        raise UsageError("empty --concept; give an Imagenette class (e.g. church), nudity, or a free-text concept")
    prompts_of = lambda path: [r["prompt"] for r in read_prompts(path)]
    cls = imagenette_class(concept)
    if cls is not None:
        rows = read_prompts(os.path.join(PROMPTS_DIR, "imagenette.csv"))
        forget = [r["prompt"] for r in rows if r["class"] == cls]
        retain = [r["prompt"] for r in rows if r["class"] != cls]
        kept = [c for c in IMAGENETTE if c != cls]
        out = dict(concept=cls, kind="class", forget=forget, retain=retain, retain_classes=kept)
    elif concept.lower() == "nudity":
        forget = prompts_of(os.path.join(PROMPTS_DIR, "nudity.csv"))
        retain = prompts_of(os.path.join(PROMPTS_DIR, "nudity_retain.csv"))
        out = dict(concept="nudity", kind="nudity", forget=forget, retain=retain, retain_classes=[])
    elif retain_file is None:
        known = f"neither an Imagenette class ({', '.join(IMAGENETTE)}) nor 'nudity'"
        raise UsageError(f"concept {concept!r} is {known}: give its retain prompts with --retain_prompts FILE")
    else:
        forget = [t.format(c=concept) for t in ["an image of {c}", "a photo of {c}", "a painting of {c}", "{c}"]]
        out = dict(concept=concept, kind="free", forget=forget, retain=[], retain_classes=[])
    if retain_file is not None:
        out["retain"] = prompts_of(retain_file)
    if not out["forget"] or not out["retain"]:
        raise UsageError(f"concept {concept!r} has no {'forget' if not out['forget'] else 'retain'} prompts")
    return out


def versions() -> dict:
    import diffusers
    import transformers

    packages = (torch, diffusers, transformers, np)
    return dict(python=platform.python_version(), **{p.__name__: p.__version__ for p in packages})


def git_commit() -> str | None:
    """This repository's HEAD, with "-dirty" when a tracked file has changed; None outside git."""
    git = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=5)
    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "") if head.returncode == 0 else None


def init_run(args, method: str, model: Model, extra: dict | None = None) -> str:
    """Create (or, with --resume, reopen) the run folder and write args.json with every resolved setting."""
    run = args.out_dir or os.path.join("runs", f"{method}__{args.concept.replace(' ', '_')}__s{args.seed}")
    trained = os.path.exists(os.path.join(run, "checkpoint")) or os.path.exists(os.path.join(run, "unet"))
    if os.path.exists(os.path.join(run, "args.json")) and trained and not args.resume:
        hint = "pass --resume to continue it or --out_dir to choose another folder"
        raise UsageError(f"run folder {run!r} already holds a run; {hint}")
    os.makedirs(run, exist_ok=True)
    base_model = model.path if model.world == "sd" else "tiny"
    command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])
    info = dict(base_model=base_model, world=model.world, versions=versions(), git_commit=git_commit(), command=command)
    record = dict(method=method, args=dict(vars(args)), **info, **(extra or {}))
    save_json(os.path.join(run, "args.json"), record)
    return run


def log_metrics(run: str, step: int, values: dict) -> None:
    """Append one line to metrics.jsonl (flushed and synced, so a crash loses at most the line being written)."""
    line = {"step": step, **{k: float(v) if torch.is_tensor(v) else v for k, v in values.items()}}
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_dir(path: str, write_fn) -> None:
    """Write a folder atomically: `write_fn(tmp)` fills the new sibling folder tmp, which then replaces `path`."""
    tmp, old = path + ".tmp", path + ".old"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    write_fn(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def save_unet(unet, path: str) -> None:
    """Save a UNet in diffusers format (safetensors), atomically."""
    _write_dir(path, lambda tmp: unet.save_pretrained(tmp, safe_serialization=True))


def save_checkpoint(run: str, step: int, modules: dict, optimizers: dict, extra: dict | None = None) -> None:
    """Everything --resume needs, atomically, as safetensors + JSON in run/checkpoint/: modules (name -> nn.Module),
    optimizers (name -> torch optimizer), `extra` (JSON-able values) and the torch and numpy RNG states."""
    tensors, meta = {}, dict(step=step, extra=extra or {}, optimizers={})
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"module.{name}.{k}"] = v.detach().contiguous().cpu()
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        meta["optimizers"][name] = dict(param_groups=sd["param_groups"], scalars={})
        for pid, state in sd["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{name}.{pid}.{k}"] = v.detach().contiguous().cpu()
                else:
                    meta["optimizers"][name]["scalars"][f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    meta["rng_numpy"] = np.random.get_state()[1].tolist()

    def write(folder):
        save_file(tensors, os.path.join(folder, "state.safetensors"))
        with open(os.path.join(folder, "state.json"), "w") as f:
            json.dump(meta, f)

    _write_dir(os.path.join(run, "checkpoint"), write)


def load_checkpoint(run: str, modules: dict, optimizers: dict) -> dict:
    """Restore what save_checkpoint wrote and truncate metrics.jsonl to its step; returns {"step", "extra"}."""
    folder = os.path.join(run, "checkpoint")
    if not os.path.exists(os.path.join(folder, "state.json")):
        raise UsageError(f"--resume: {run!r} has no checkpoint to resume from")
    tensors = load_file(os.path.join(folder, "state.safetensors"))
    meta = json.load(open(os.path.join(folder, "state.json")))
    for name, m in modules.items():
        prefix = f"module.{name}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if not state:
            hint = "resume with the flags the run was started with (its args.json)"
            raise UsageError(f"--resume: the checkpoint in {run!r} has no {name!r} state; {hint}")
        m.load_state_dict(state)
    for name, opt in optimizers.items():
        prefix, saved, state = f"opt.{name}.", meta["optimizers"][name], {}
        stored = [(k[len(prefix) :], v) for k, v in tensors.items() if k.startswith(prefix)]
        for k, v in stored + list(saved["scalars"].items()):  # keys "{param id}.{state key}"
            pid, key = k.split(".", 1)
            state.setdefault(int(pid), {})[key] = v
        opt.load_state_dict(dict(state=state, param_groups=saved["param_groups"]))
    torch.set_rng_state(tensors["rng.torch"])
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.array(meta["rng_numpy"], dtype=np.uint32), *np_state[2:]))
    metrics = os.path.join(run, "metrics.jsonl")
    if os.path.exists(metrics):
        lines = [ln for ln in open(metrics) if ln.strip() and json.loads(ln)["step"] <= meta["step"]]
        atomic_write(metrics, lambda f: f.writelines(lines))
    return dict(step=meta["step"], extra=meta["extra"])


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UNetPassClock:
    """The denominator of a step's efficiency: the time of the UNet calls a step makes, alone, measured between the
    run's steps under the same machine load (time per step / this = the overhead factor, 1.0 = only UNets). pass_sets:
    {name: [(unet, batch, backward), ...]}, on random inputs: with backward a forward and backward through a trained
    (fp32, autocast) UNet, gradients then cleared, else a no-grad forward; `tick` times them every steps // samples."""

    def __init__(self, model: Model, pass_sets: dict, steps: int, samples: int = 10):
        self.model, self.pass_sets, self.every = model, pass_sets, max(1, steps // samples)
        self.times = {name: [] for name in pass_sets}

    def tick(self, step: int) -> None:
        """Call after step `step` (0-based, counted from the run's start) has been timed."""
        if step % self.every == 0:
            self.measure()

    def seconds(self, name: str) -> float:
        """A set's mean time."""
        if not self.times[name]:  # no step ran in this process (e.g. resumed at the end): time them now
            self.measure()
        return sum(self.times[name]) / len(self.times[name])

    def measure(self) -> None:
        for name, passes in self.pass_sets.items():
            self.times[name].append(self.time(passes, warmup=not self.times[name]))

    def time(self, passes: list, warmup: bool) -> float:
        """Seconds of one run of `passes`, after an untimed one with `warmup` (allocations, kernel selection)."""
        m, gen, inputs = self.model, torch.Generator().manual_seed(0), []
        for _, n, _ in passes:  # x_t, t and text states of the model's shapes
            x = torch.randn(n, *m.latent_shape, generator=gen)
            t = torch.randint(0, m.scheduler.config.num_train_timesteps, (n,), generator=gen)
            c = torch.randn(n, m.tokenizer.model_max_length, m.text_encoder.config.hidden_size, generator=gen)
            inputs.append((x.to(m.device), t.to(m.device), c.to(m.device)))

        def run():
            for (unet, _, backward), (x, t, c) in zip(passes, inputs):
                dtype = next(unet.parameters()).dtype
                with autocast(m.device, m.dtype), torch.set_grad_enabled(backward):
                    out = unet(x.to(dtype), t, c.to(dtype)).sample
                if backward:
                    out.float().square().mean().backward()
            sync(m.device)

        if warmup:
            run()
        t0 = time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
        for unet, _, backward in passes:
            if backward:
                unet.zero_grad(set_to_none=True)
        return seconds


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on a GPU, peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def fmt(x: float | None, digits: int = 2) -> str:
    """A ratio for a summary line: rounded, or "n/a" when there is none (e.g. a resumed run with no step left)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop with a clear message on a NaN/inf loss (the last checkpoint is kept untouched)."""
    if not torch.isfinite(loss):
        hint = "the run stopped and its last checkpoint is kept (lower --lr, or resume from the checkpoint)"
        raise UsageError(f"loss became {loss.item()} at step {step}; {hint}")


@torch.no_grad()
def sample_grid(model, unets: list, prompts: list, path: str, n=4, steps=25, guidance=7.5, seed=0, t_init=None):
    """A PNG: a row per prompt, n images per UNet side by side (before | after), same seeds; `t_init` as in `sample`."""
    labels = ["before", "after"] if len(unets) == 2 else [f"model {i}" for i in range(len(unets))]
    cond = encode_prompts(model, [p for p in prompts for _ in range(n)])
    z_T = initial_latents(model, [seed + k for _ in prompts for k in range(n)])
    h, gap = model.resolution, max(2, model.resolution // 8)  # image side, white separator between UNets
    blocks = []
    for unet in unets:
        with autocast(model.device, model.dtype):
            imgs = decode(model, sample(model, cond, z_T, steps, guidance, unet=unet, t_init=t_init))
        rows = imgs.reshape(len(prompts), n, h, h, 3).transpose(0, 2, 1, 3, 4)
        blocks += [rows.reshape(len(prompts) * h, n * h, 3), np.full((len(prompts) * h, gap, 3), 255, np.uint8)]
    grid = np.concatenate(blocks[:-1], axis=1)
    scale = max(1, 128 // grid.shape[0] * 2)  # small grids are upscaled for viewing
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.NEAREST)
    block = n * h * scale  # one UNet's columns, in output pixels
    centers = [i * (block + gap * scale) + block / 2 for i in range(len(unets))]
    save_png(path, label_grid(img, labels, centers, prompts, h * scale))


def label_grid(img: Image.Image, col_labels: list[str], col_centers: list[float], row_labels: list[str], row_h: int):
    """`img` with a white header holding each column label (centred at `col_centers`, in img's pixels) and a white
    left margin holding each row's label (rows of `row_h` pixels, wrapped and cut to fit), in PIL's default font."""
    font = ImageFont.load_default(size=max(10, row_h // 6))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line_h = 4, font.getbbox("Ag")[3] + 2

    def wrap(text: str, width: float, max_lines: int) -> list[str]:
        lines = []
        for word in text.split():
            if lines and measure.textlength(f"{lines[-1]} {word}", font=font) <= width:
                lines[-1] += f" {word}"
            else:
                lines.append(word)
        if len(lines) > max_lines:  # cut, and say so
            lines = lines[:max_lines]
            lines[-1] += " ..."
        return lines

    width = 12 * getattr(font, "size", 10)  # about 24 characters per line
    rows = [wrap(text, width, max(1, row_h // line_h)) for text in row_labels]
    left = int(max([measure.textlength(ln, font=font) for lines in rows for ln in lines] + [0])) + 2 * pad
    top = line_h + 2 * pad
    out = Image.new("RGB", (left + img.width, top + img.height), "white")
    out.paste(img, (left, top))
    draw = ImageDraw.Draw(out)
    for label, x in zip(col_labels, col_centers):
        draw.text((left + x - measure.textlength(label, font=font) / 2, pad), label, fill="black", font=font)
    for r, lines in enumerate(rows):
        y = top + r * row_h + (row_h - len(lines) * line_h) / 2
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill="black", font=font)
    return out
