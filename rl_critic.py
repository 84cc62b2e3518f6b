"""RL unlearning: PPO on the reverse-diffusion policy with a CLIP-based, timestep-aware (FiLM) critic of noisy states.

Paper: "Critic-Guided Reinforcement Unlearning in Text-to-Image Diffusion", arXiv 2601.03213 (2026). No code is
public: a reconstruction on DDPO's structure (Black et al., arXiv 2305.13301) plus the critic, in CleanRL's PPO style.

Idea. Denoising is a decision process: state (c, t, x_t), action x_{t-1} ~ pi_theta = the stochastic DDIM kernel (eta
1, guided), reward only on the decoded x_0: -p(concept) for forget prompts, p(own class) for retain prompts. A critic
V_phi(x_t, t, c) on CLIP features of x_t and c, FiLM-conditioned on t, is fitted to the terminal reward; its values
give per-step advantages (GAE) for PPO's clipped loss (--advantage none: DDPO's per-prompt normalisation, no critic):

    A_t = sum_l lambda^l delta_{t-l},  delta_t = V(x_{t-1}) - V(x_t),  V(x_0) := r
    L   = E_t max(-A_t ratio_t, -A_t clip(ratio_t, 1 - eps, 1 + eps)),  ratio_t = pi_theta / pi_old

Trust regions: --kl_weight, the exact kernel KL to the reference on retain prompts; --forget_kl_weight, the same on
forget prompts toward ESD's eps_ref(x_t, "") - eta (eps_ref(x_t, c_f) - eps_ref(x_t, "")): this repository's
extension, not the paper's (--forget_kl_weight 0 is the paper's method). Deviations:
- the critic's details are not public: an MLP on a frozen CLIP's features of the decoded x_t and of c (tiny:
  data/tiny-clip; SD: ViT-L/14); --critic_input clean reads the reference's x0_hat instead (the paper's ablation);
- the reward follows from the world, never the judge: tiny, a small CNN trained on Pictonette; SD, CLIP zero-shot;
- the policy trains on the first 60% of each rollout's steps (--train_fraction).

SD:   python rl_critic.py --model CompVis/stable-diffusion-v1-4 --concept church  (cost: README)
Tiny: python rl_critic.py --concept church  (1,414 s with 5 jobs on the 2 cores, peak 1.10 GB: docs/results.md)
"""

import argparse
import copy
import hashlib
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as serialize
from tqdm import tqdm

import common
from data.pictonette import make

# Defaults that differ between the worlds, chosen from the loaded model; an explicit flag always wins.
WORLD_DEFAULTS = {
    "tiny": dict(steps=80, lr=1e-3, batch_size=32, train_params="xattn", lora_rank=0, sample_steps=10),
    "sd": dict(steps=40, lr=3e-4, batch_size=8, train_params=None, lora_rank=4, sample_steps=20),
}
# The reward model follows from the world (never the evaluation judge); benchmark/sd_architecture.py patches "sd".
REWARD_MODELS = {"tiny": "SmallCNN trained on Pictonette (fit_classifier)", "sd": "openai/clip-vit-large-patch14"}
TINY_CLIP = os.path.join(common.ROOT, "data", "tiny-clip")  # the tiny critic's CLIP (SD's: REWARD_MODELS["sd"])
BUCKETS = [0, 250, 500, 750, 1000]  # timestep buckets for the critic's explained variance


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = argparse.BooleanOptionalAction
    p.add_argument("--concept", default="church", help="an Imagenette class, or 'nudity' (SD)")
    p.add_argument("--model", default="tiny", help="'tiny', a hub id (CompVis/stable-diffusion-v1-4), or a folder")
    p.add_argument("--steps", type=int, help="RL iterations (rollouts + updates each; tiny 80, sd 40)")
    p.add_argument("--lr", type=float, help="Adam learning rate of the policy (tiny 1e-3, sd 3e-4)")
    p.add_argument("--batch_size", type=int, help="trajectories per iteration (tiny 32, sd 8)")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, numpy, torch, the rollouts and the shuffles")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="frozen models' dtype")
    p.add_argument("--train_params", choices=["full", "xattn", "xattn-kv", "noxattn"], help="ESD's groups, if no LoRA")
    p.add_argument("--out_dir", help="run folder (default runs/rl_critic__{concept}__s{seed})")
    p.add_argument("--log_every", type=int, default=1, help="log every N iterations")
    p.add_argument("--sample_every", type=int, default=0, help="write samples.png every N iterations (0: at the end)")
    p.add_argument("--resume", action=flag, default=False, help="continue the run in --out_dir from its checkpoint")
    # method
    p.add_argument("--lora_rank", type=int, help="LoRA rank on attention projections (0: no LoRA; tiny 0, sd 4)")
    p.add_argument("--advantage", default="gae", choices=["gae", "none"], help="GAE from the critic, or none (DDPO's)")
    p.add_argument("--gae_lambda", type=float, default=0.9, help="GAE's lambda (0: one-step TD, 1: r - V)")
    p.add_argument("--adv_clip", type=float, default=5.0, help="normalised advantages are clipped to +-this")
    p.add_argument("--clip_range", type=float, default=0.1, help="PPO clip epsilon on the importance ratio")
    p.add_argument("--inner_epochs", type=int, default=1, help="passes over each batch of stored trajectories")
    p.add_argument("--num_minibatches", type=int, default=2, help="optimizer steps per inner epoch")
    p.add_argument("--train_fraction", type=float, default=0.6, help="the policy trains on the steps' first fraction")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping of the policy")
    p.add_argument("--kl_weight", type=float, default=0.1, help="weight of KL(pi_theta || pi_ref) on retain prompts")
    p.add_argument("--forget_kl_weight", type=float, default=0.1, help="the same on forget prompts, to ESD's eps")
    p.add_argument("--negative_guidance", type=float, default=1.0, help="ESD's eta: eps('') - eta (eps(c_f) - eps(''))")
    p.add_argument("--forget_fraction", type=float, default=0.5, help="fraction of each batch given forget prompts")
    p.add_argument("--sample_steps", type=int, help="DDIM steps of a rollout (tiny 10, sd 20)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta of rollouts (> 0: a stochastic policy)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance of rollouts and samples")
    p.add_argument("--critic_input", default="noisy", choices=["noisy", "clean"], help="x_t, or the reference x0_hat")
    p.add_argument("--critic_width", type=int, default=256, help="hidden width of the critic's MLP")
    p.add_argument("--critic_lr", type=float, default=1e-3, help="Adam learning rate of the critic")
    p.add_argument("--critic_epochs", type=int, default=4, help="critic passes over each batch of states")
    p.add_argument("--critic_warmup", type=int, default=2, help="first iterations fit only the critic (no update)")
    p.add_argument("--per_prompt_buffer", type=int, default=32, help="rewards kept per prompt (--advantage none)")
    p.add_argument("--gradient_checkpointing", action=flag, help="trade compute for memory (sd: on, tiny: off)")
    p.add_argument("--save_every", type=int, default=10, help="checkpoint + unet/ every N iterations (0: at the end)")
    args = p.parse_args(argv)
    for name in ["steps", "log_every", "inner_epochs", "num_minibatches", "sample_steps", "critic_epochs"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in ["sample_every", "save_every", "kl_weight", "forget_kl_weight", "critic_warmup", "lora_rank"]:
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name in ["lr", "critic_lr", "clip_range", "adv_clip", "max_grad_norm", "eta", "negative_guidance"]:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name} must be > 0 (got {getattr(args, name)})")
    if not 0 < args.train_fraction <= 1:
        p.error(f"--train_fraction must be in (0, 1] (got {args.train_fraction})")
    for name in ["gae_lambda", "forget_fraction"]:
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name} must be in [0, 1] (got {getattr(args, name)})")
    if args.batch_size is not None and args.batch_size < 2:
        p.error(f"--batch_size must be >= 2 (one forget and one retain trajectory; got {args.batch_size})")
    return args


def fill_world_defaults(args, world: str) -> None:
    for k, v in WORLD_DEFAULTS[world].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = world == "sd"
    if args.num_minibatches > args.batch_size:
        raise common.UsageError(f"--num_minibatches {args.num_minibatches} exceeds --batch_size {args.batch_size}")


# ALGO LOGIC: the critic V(x_t, t, c) on CLIP features (arXiv 2601.03213: a CLIP-based reward predictor on noisy states)
class CLIPFeatures:
    """A frozen CLIP (tiny: data/tiny-clip; SD: CLIP ViT-L/14, the reward's): unit image features of decoded latents
    (B, 4, h, w) -> (B, D), resized and normalised as its image processor does, and unit text features of prompts."""

    def __init__(self, model, src: str):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.model, self.tok = model, AutoTokenizer.from_pretrained(src)
        self.net = CLIPModel.from_pretrained(src).to(model.device).eval().requires_grad_(False)
        proc = AutoImageProcessor.from_pretrained(src, use_fast=False)
        self.size = (proc.crop_size["height"], proc.crop_size["width"])
        self.mean = torch.tensor(proc.image_mean, device=model.device)[:, None, None]
        self.std = torch.tensor(proc.image_std, device=model.device)[:, None, None]

    @torch.no_grad()
    def images(self, latents: torch.Tensor, batch: int = 64) -> torch.Tensor:
        out, vae = [], self.model.vae
        for z in latents.split(batch):
            x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample.float()
            x = F.interpolate((x / 2 + 0.5).clamp(0, 1), size=self.size, mode="bicubic", antialias=True)
            out.append(F.normalize(self.net.get_image_features(pixel_values=(x - self.mean) / self.std), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tok(prompts, padding=True, truncation=True, return_tensors="pt").to(self.model.device)
        return F.normalize(self.net.get_text_features(**ids), dim=-1)


class Critic(torch.nn.Module):
    """V(x_t, t, c): an MLP on [CLIP image features of x_t, CLIP text features of c] whose two hidden layers are
    FiLM-modulated by a sinusoidal embedding of t (Perez et al. 2018): h <- h (1 + gamma(t)) + beta(t); -> (B,)."""

    def __init__(self, dim: int, width: int = 256):
        super().__init__()
        nn = torch.nn
        self.inp, self.hidden, self.out = nn.Linear(2 * dim, width), nn.Linear(width, width), nn.Linear(width, 1)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.film = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 4 * width))  # 2x (gamma, beta)

    def forward(self, image: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        emb = get_timestep_embedding(t, self.inp.out_features, flip_sin_to_cos=True, downscale_freq_shift=0)
        g1, b1, g2, b2 = self.film(emb).chunk(4, dim=-1)
        h = F.silu(self.norms[0](self.inp(torch.cat([image, text], dim=-1).float())) * (1 + g1) + b1)
        h = F.silu(self.norms[1](self.hidden(h)) * (1 + g2) + b2)
        return self.out(h).squeeze(-1)


# ALGO LOGIC: advantages, the PPO loss, the kernel KL
def advantages(values: torch.Tensor, rewards: torch.Tensor, gae_lambda: float) -> torch.Tensor:
    """GAE (Schulman et al. 2016), gamma 1: (T, B) from values (T, B) at x_T..x_1 and rewards (B,); V(x_0) := r."""
    delta = torch.cat([values[1:], rewards[None]]) - values
    adv, running = torch.zeros_like(delta), torch.zeros_like(rewards)
    for k in reversed(range(len(delta))):
        adv[k] = running = delta[k] + gae_lambda * running
    return adv


def normalize(adv: torch.Tensor, groups: torch.Tensor, clip: float) -> torch.Tensor:
    """(A - mean) / std within each group of trajectories (forget / retain rewards differ in sign), clipped."""
    out = torch.zeros_like(adv)
    for g in groups.unique():
        a = adv[:, groups == g]
        out[:, groups == g] = (a - a.mean()) / (a.std() + 1e-8) if a.numel() > 1 else 0.0
    return out.clamp(-clip, clip)


def per_prompt_normalize(history: dict, prompts: list[str], rewards: torch.Tensor, buffer: int) -> torch.Tensor:
    """DDPO's: (r - mean) / std over the prompt's last `buffer` rewards (`history`), the batch's while < buffer / 2."""
    out = torch.empty_like(rewards)
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        history[p] = hist = (history.get(p, []) + rewards[idx].tolist())[-buffer:]
        ref = torch.tensor(hist) if len(hist) >= buffer // 2 else rewards
        out[idx] = (rewards[idx] - ref.mean()) / (ref.std() + 1e-6)
    return out


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, adv: torch.Tensor, clip_range: float):
    """CleanRL's clipped surrogate: mean max(-A ratio, -A clip(ratio, 1 -+ eps)); also approx_kl and clipfrac."""
    logratio = log_prob - old_log_prob
    ratio = logratio.exp()
    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    with torch.no_grad():  # approx_kl: Schulman's unbiased low-variance estimator
        info = dict(old_approx_kl=(-logratio).mean(), approx_kl=((ratio - 1) - logratio).mean())
        info["clipfrac"] = ((ratio - 1).abs() > clip_range).float().mean()
    return pg_loss, info


def kernel_kl(scheduler, eps: torch.Tensor, eps_ref: torch.Tensor, t: int, steps: int, eta: float) -> torch.Tensor:
    """KL of two DDIM kernels N(mu, s^2 I) at one x_t (common.ddim_step's arithmetic), mu(eps) and mu(eps_ref): mu is
    linear in eps, slope k = sqrt(1 - a_prev - s^2) - sqrt(a_prev (1 - a_t) / a_t): KL = k^2 |eps - eps_ref|^2 / 2s^2"""
    acp, t_prev = scheduler.alphas_cumprod.double(), t - scheduler.config.num_train_timesteps // steps
    final = torch.tensor(1.0, dtype=torch.float64) if scheduler.config.get("set_alpha_to_one", True) else acp[0]
    a_t, a_prev = acp[t], (acp[t_prev] if t_prev >= 0 else final)
    var = eta**2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    k = (1 - a_prev - var) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5
    sq = (eps.float() - eps_ref.float()).pow(2).sum(dim=tuple(range(1, eps.ndim)))
    return float(k**2 / (2 * var)) * sq


def reference_eps(unet, x, t, cond, uncond, rows_r, rows_f, guidance: float, negative_guidance: float) -> torch.Tensor:
    """The reference's eps for the trust regions (float32): guided on the retain rows, ESD's eps(x, "") - eta (eps(x,
    c_f) - eps(x, "")) (arXiv 2303.07345, Sec. 3) on the forget rows, zero elsewhere; one UNet call, as clocked."""
    rows, n_r, n_f = [rows_r, rows_r, rows_f, rows_f], int(rows_r.sum()), int(rows_f.sum())
    text = torch.cat([uncond.expand(n_r, -1, -1), cond[rows_r], uncond.expand(n_f, -1, -1), cond[rows_f]])
    out = unet(torch.cat([x[m] for m in rows]), torch.cat([t[m] for m in rows]), text).sample.float()
    eps_u, eps_c, eps_f, eps_fc = out.split([n_r, n_r, n_f, n_f])
    eps = torch.zeros(x.shape, device=x.device)
    eps[rows_r] = eps_u + guidance * (eps_c - eps_u)
    eps[rows_f] = eps_f - negative_guidance * (eps_fc - eps_f)
    return eps


def explained_variance(pred: torch.Tensor, target: torch.Tensor) -> float:
    """CleanRL's explained_var: 1 - Var(target - pred) / Var(target) (nan when constant or fewer than 2 values)."""
    return float("nan") if len(target) < 2 or target.var() == 0 else float(1 - (target - pred).var() / target.var())


def critic_report(ev_log: list, steps: int) -> dict | None:
    """The critic's explained variance on unseen trajectories per timestep bucket, over the run's second half."""
    late = [e for e in ev_log if e["step"] >= steps // 2]
    if not late:
        return None
    t, pred, r, forget = (torch.cat([e[k] for e in late]) for k in ["t", "pred", "r", "forget"])
    out = dict(iterations=len(late))
    for lo, hi in zip(BUCKETS[:-1], BUCKETS[1:]):
        m = (t >= lo) & (t < hi)
        ev_all, ev_forget = explained_variance(pred[m], r[m]), explained_variance(pred[m & forget], r[m & forget])
        out[f"t{lo}-{hi - 1}"] = dict(all=ev_all, forget=ev_forget)
    return out


# PLUMBING: the reward models (never the evaluation judge)
class Reward:
    """Probabilities over [concept, *retain labels] of decoded latents: tiny, fit_classifier's CNN; SD, CLIP zero-shot
    ("an image of a {label}"); `own`: per retain prompt, the index of its own label."""

    def __init__(self, model, prompts: dict):
        names = prompts["retain_classes"] or prompts["retain"]  # a class concept: one retain prompt per retain class
        unique = list(dict.fromkeys(names))
        labels, self.own = [prompts["concept"], *unique], [1 + unique.index(c) for c in names]
        self.model, self.clip = model, None
        if model.world == "tiny":
            self.cnn = fit_classifier(model).to(model.device)
            self.index = torch.tensor([common.IMAGENETTE.index(c) for c in labels], device=model.device)
            return
        self.clip = CLIPFeatures(model, REWARD_MODELS["sd"])
        self.text = self.clip.texts([f"an image of a {c}" if common.imagenette_class(c) else c for c in labels])

    @torch.no_grad()
    def probs(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, K) probabilities of the images that latents (N, 4, h, w) decode to, over the labels."""
        if self.clip is None:  # the CNN reads the uint8 images, as it was trained
            x = torch.from_numpy(common.decode(self.model, latents)).permute(0, 3, 1, 2).float() / 127.5 - 1
            return self.cnn(x.to(self.model.device)).softmax(-1)[:, self.index]
        return (self.clip.net.logit_scale.exp() * self.clip.images(latents) @ self.text.T).softmax(-1)


class SmallCNN(torch.nn.Sequential):
    """The tiny world's reward classifier: 4 conv layers and a linear head over the 10 classes, (B, 3, 32, 32)."""

    def __init__(self, classes: int = 10, w: int = 32):
        conv = lambda i, o, s: [torch.nn.Conv2d(i, o, 3, s, 1), torch.nn.GroupNorm(8, o), torch.nn.SiLU()]  # noqa: E731
        layers = [*conv(3, w, 1), *conv(w, 2 * w, 2), *conv(2 * w, 4 * w, 2), *conv(4 * w, 4 * w, 2)]
        super().__init__(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * w, classes))


def world_fingerprint(model) -> str:
    """8 hex digits of the tiny VAE's weights and the Pictonette drawings: a cached CNN is never used on a new world."""
    h = hashlib.sha256(make(8, seed=0)["images"].tobytes())
    for key, value in sorted(model.vae.state_dict().items()):
        h.update(key.encode() + value.detach().float().cpu().numpy().tobytes())  # as two update() calls would
    return h.hexdigest()[:8]


def fit_classifier(model, seed: int = 0, n: int = 4000, iters: int = 800) -> SmallCNN:
    """SmallCNN on n Pictonette images (seeds unlike eval's), half through the tiny VAE (its blur), plus noise; 91%
    held-out accuracy, harder to fool than tiny-clip. Fitted once (about 6 CPU-minutes), cached in runs/.cache/."""
    net = SmallCNN()
    name = f"reward_cnn_n{n}_i{iters}_s{seed}_{world_fingerprint(model)}.safetensors"
    path = os.path.join(common.ROOT, "runs", ".cache", name)
    if os.path.exists(path):
        net.load_state_dict(load_file(path))
        return net.eval().requires_grad_(False)
    data = make(n, seed=20_000 + seed)
    images, gen = data["images"].copy(), torch.Generator().manual_seed(seed)
    for i in range(0, n // 2, 256):  # the VAE's blur, as in the model's generations
        chunk = slice(i, min(i + 256, n // 2))
        images[chunk] = common.decode(model, common.encode_images(model, images[chunk], gen))
    x, y = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, torch.from_numpy(data["labels"])
    n_fit, opt = n - 400, torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in tqdm(range(iters), desc="reward classifier", leave=False):
        j = torch.randint(n_fit, (128,), generator=gen)
        noise = 0.1 * torch.rand(len(j), 1, 1, 1, generator=gen) * torch.randn(x[j].shape, generator=gen)
        loss = F.cross_entropy(net(x[j] + noise), y[j])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    acc = (net(x[n_fit:]).argmax(-1) == y[n_fit:]).float().mean().item()  # no graph: no parameter needs a gradient
    print(f"rl_critic: reward classifier trained, held-out accuracy {acc:.3f} on {n - n_fit} Pictonette images")
    state = serialize({k: v.contiguous() for k, v in net.state_dict().items()})
    common.atomic_write(path, lambda f: f.write(state), "wb")
    return net


def merged_unet(unet, lora: bool):
    """The UNet to save/evaluate: the trained UNet, or a copy with the LoRA weights fused in (plain diffusers)."""
    if not lora:
        return unet
    out = copy.deepcopy(unet)
    out.fuse_lora()
    out.unload_lora()
    return out


def main(args):
    # PLUMBING: prompts, model, reward, run folder
    prompts = common.concept_prompts(args.concept, None)  # fails early on an unknown concept
    common.seed_everything(args.seed)
    model = common.load_model(args.model, args.device, args.dtype)
    fill_world_defaults(args, model.world)
    if model.world == "tiny" and prompts["kind"] != "class":
        raise common.UsageError(f"the tiny world's reward CNN knows Imagenette classes only (got {args.concept!r})")
    run = common.init_run(args, "rl_critic", model, extra=dict(reward_model=REWARD_MODELS[model.world]))
    t_start = time.perf_counter()
    reward_model = Reward(model, prompts)
    all_prompts = prompts["forget"] + prompts["retain"]
    states, uncond = common.encode_prompts(model, all_prompts), common.encode_prompts(model, [""])  # (P, L, D)
    clip = reward_model.clip or CLIPFeatures(model, TINY_CLIP)  # the critic's CLIP (SD: the reward's)
    text_features = clip.texts(all_prompts)  # (P, D): the critic's text input
    unet = common.trainable_unet(model, args.gradient_checkpointing)
    if args.lora_rank > 0:
        from peft import LoraConfig

        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=targets))
        params = [p for p in unet.parameters() if p.requires_grad]
        args.train_params = f"lora-r{args.lora_rank}"
    else:
        params = common.select_params(unet, args.train_params)
    critic = Critic(text_features.shape[-1], args.critic_width).to(model.device)
    opt, opt_v = torch.optim.Adam(params, lr=args.lr), torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    modules, optimizers = {"unet": unet, "critic": critic}, {"opt": opt, "opt_v": opt_v}
    history, start = {}, 0  # per prompt, its last rewards (--advantage none)
    if args.resume:
        ck = common.load_checkpoint(run, modules, optimizers)
        start, history = ck["step"], ck["extra"]["per_prompt_history"]
    B, T, sched = args.batch_size, args.sample_steps, model.scheduler
    n_forget = max(1, min(B - 1, round(args.forget_fraction * B)))
    timesteps, T_train = torch.tensor(common.ddim_timesteps(sched, T)), math.ceil(args.train_fraction * T)  # x_T first
    print(
        f"rl_critic: {model.path} ({model.device}, {model.dtype}), {prompts['concept']!r}, advantage {args.advantage}, "
        f"{sum(p.numel() for p in params) / 1e6:.3f}M trained ({args.train_params}), iterations {start}-{args.steps}"
    )

    def save(step: int) -> None:
        common.save_unet(merged_unet(unet, args.lora_rank > 0), os.path.join(run, "unet"))
        state = serialize({k: v.detach().contiguous().cpu() for k, v in critic.state_dict().items()})
        common.atomic_write(os.path.join(run, "critic.safetensors"), lambda f: f.write(state), "wb")
        common.save_checkpoint(run, step, modules, optimizers, extra=dict(per_prompt_history=history))

    def samples() -> None:
        grid = prompts["forget"][:1] + list(dict.fromkeys(prompts["retain"]))[:3]
        unets = [model.unet, merged_unet(unet, args.lora_rank > 0)]
        common.sample_grid(model, unets, grid, os.path.join(run, "samples.png"), guidance=args.guidance, seed=args.seed)

    # The UNet passes of an iteration (rollout, update, the reference's), timed between iterations (efficiency's unit)
    pass_sets = {"rollout": [(unet, 2 * B, False)], "update": [(unet, 2 * math.ceil(B / args.num_minibatches), True)]}
    if args.critic_input == "clean":
        pass_sets["clean"] = [(model.unet, B, False)]
    n_kl = (2 * (B - n_forget) if args.kl_weight else 0) + (2 * n_forget if args.forget_kl_weight else 0)
    if n_kl:
        pass_sets["kl"] = [(model.unet, n_kl, False)]
    clock = common.UNetPassClock(model, pass_sets, args.steps - start)
    phases = dict(rollout=0.0, reward=0.0, critic=0.0, kl_reference=0.0, policy=0.0)  # seconds, for summary.json

    def lap(name: str, since: float) -> float:
        common.sync(model.device)
        phases[name] += (now := time.perf_counter()) - since
        return now

    # ALGO LOGIC: the training loop
    iter_time, window, train_time, ev_log = 0.0, 0, 0.0, []
    for step in tqdm(range(start, args.steps), desc="rl_critic", initial=start, total=args.steps):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # rollouts and shuffles of this iteration
        # 1. rollouts: n_forget forget prompts, the rest cycling through the retain prompts (random order)
        idx_f = torch.arange(n_forget) % len(prompts["forget"])
        idx_r = len(prompts["forget"]) + torch.randperm(len(prompts["retain"]), generator=gen).repeat(B)[: B - n_forget]
        idx, is_forget = torch.cat([idx_f, idx_r]), torch.arange(B) < n_forget  # (B,) prompt index into all_prompts
        cond = states[idx]
        z_T = torch.randn(B, *model.latent_shape, generator=gen).to(model.device)  # fp32: the sampler's arithmetic
        unet.eval()
        with torch.no_grad(), common.autocast(model.device, model.dtype):
            traj = common.sample(
                model, cond, z_T, T, args.guidance, args.eta, unet=unet, generator=gen, return_trajectory=True
            )
        lat, old_logp = traj["latents"].float(), traj["log_probs"].float()  # (T+1, B, 4, h, w) x_T..x_0, (T, B)
        t_lap = lap("rollout", t0)
        # 2. rewards on the decoded final image: -p(concept) for forget prompts, p(own label) for retain prompts
        p = reward_model.probs(lat[-1])  # (B, K) over [concept, *retain labels]
        own = torch.tensor([0] * n_forget + [reward_model.own[i - len(prompts["forget"])] for i in idx_r.tolist()])
        rewards = torch.where(is_forget.to(p.device), -p[:, 0], p[torch.arange(B), own]).float().cpu()
        t_lap = lap("reward", t_lap)
        # 3. critic values at the states before each action, advantages, then the critic's own fit
        t_flat = timesteps.repeat_interleave(B).to(model.device)  # (T*B,)
        x_flat = lat[:-1].reshape(T * B, *lat.shape[2:])
        text_flat = text_features[idx].repeat(T, 1)
        if args.critic_input == "clean":  # the reference model's x0_hat, B states per call
            with torch.no_grad(), common.autocast(model.device, model.dtype):
                chunks = zip(x_flat.split(B), t_flat.split(B), cond.repeat(T, 1, 1).split(B))
                eps_ref = torch.cat([model.unet(x.to(model.dtype), t, c).sample.float() for x, t, c in chunks])
            x_flat = common.x0_from_eps(sched, x_flat, eps_ref, t_flat).float()
        stats = {}
        if args.advantage == "gae":
            x_flat = clip.images(x_flat)  # (T*B, D): what the critic reads of each state
            with torch.no_grad():
                values = critic(x_flat, t_flat, text_flat).reshape(T, B)
            r_flat, f_flat = rewards.to(model.device).repeat(T), is_forget.to(model.device).repeat(T)
            v_flat = values.flatten()
            stats["explained_var"] = explained_variance(v_flat, r_flat)  # held out: not yet fitted on this batch
            ev_log.append(dict(step=step, t=t_flat.cpu(), pred=v_flat.cpu(), r=r_flat.cpu(), forget=f_flat.cpu()))
            adv = advantages(values.cpu(), rewards, args.gae_lambda)
            v_losses = []
            for _ in range(args.critic_epochs):  # MSE to the realised terminal reward
                for j in torch.randperm(T * B, generator=gen).chunk(max(1, T * B // 128)):
                    v_loss = F.mse_loss(critic(x_flat[j], t_flat[j], text_flat[j]), r_flat[j])
                    opt_v.zero_grad(set_to_none=True)
                    v_loss.backward()
                    opt_v.step()
                    v_losses.append(v_loss.item())
            stats["v_loss"] = float(np.mean(v_losses))
        else:
            names = [all_prompts[i] for i in idx.tolist()]
            adv = per_prompt_normalize(history, names, rewards, args.per_prompt_buffer)[None].expand(T, B)
        adv = normalize(adv, is_forget, args.adv_clip)
        t_lap = lap("critic", t_lap)  # with --critic_input clean this includes the reference's passes
        # 4. PPO on the stored trajectories (not while the critic warms up), trust regions to reference_eps's eps
        kl_w = torch.where(is_forget, args.forget_kl_weight, args.kl_weight).float()  # (B,) per-row KL weight
        kl_rows, kl_ref = kl_w > 0, []
        rows_r, rows_f = (m.to(model.device) for m in (kl_rows & ~is_forget, kl_rows & is_forget))
        with torch.no_grad(), common.autocast(model.device, model.dtype):
            for k in range(T_train if kl_rows.any() else 0):
                t_k = torch.full((B,), int(timesteps[k]), device=model.device)
                x_k, g, ng = lat[k].to(model.dtype), args.guidance, args.negative_guidance
                kl_ref.append(reference_eps(model.unet, x_k, t_k, cond, uncond, rows_r, rows_f, g, ng))
        t_lap = lap("kl_reference", t_lap)
        unet.train()
        logs, first_logratio = [], torch.zeros(())
        for epoch in range(args.inner_epochs if args.advantage == "none" or step >= args.critic_warmup else 0):
            for i_mb, mb in enumerate(torch.randperm(B, generator=gen).chunk(args.num_minibatches)):
                opt.zero_grad(set_to_none=True)
                un_mb = uncond.float().expand(len(mb), -1, -1)
                for k in torch.randperm(T_train, generator=gen).tolist():
                    t_k = int(timesteps[k])
                    t_mb = torch.full((len(mb),), t_k, device=model.device)
                    with common.autocast(model.device, model.dtype):
                        eps = common.cfg_eps(unet, lat[k, mb], t_mb, cond[mb].float(), un_mb, args.guidance)
                    _, logp = common.ddim_step(sched, eps.float(), t_k, lat[k, mb], T, args.eta, prev=lat[k + 1, mb])
                    loss, info = ppo_loss(logp, old_logp[k, mb], adv[k, mb].to(logp.device), args.clip_range)
                    if epoch == 0 and i_mb == 0:  # no update yet: the policy is the one that sampled, log r must be 0
                        first_logratio = torch.maximum(first_logratio, (logp - old_logp[k, mb]).detach().abs().max())
                    if kl_ref:
                        keep, kl = kl_rows[mb], torch.zeros(len(mb), device=eps.device)
                        if keep.any():
                            kl[keep.to(eps.device)] = kernel_kl(sched, eps[keep], kl_ref[k][mb[keep]], t_k, T, args.eta)
                            loss = loss + (kl_w[mb].to(kl.device) * kl).sum() / len(mb)
                        f_mb = is_forget[mb].to(kl.device)
                        info["kl_ref"] = kl[~f_mb].mean().detach() if (~f_mb).any() else kl.new_zeros(())
                        info["kl_forget"] = kl[f_mb].mean().detach() if f_mb.any() else kl.new_zeros(())
                    common.check_finite(loss, step + 1)
                    (loss / T_train).backward()
                    logs.append(dict(pg_loss=loss.detach(), **info))
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
                opt.step()
        if logs:
            stats |= {key: torch.stack([lg[key] for lg in logs]).mean().item() for key in logs[0]}
            stats["logratio_before_update"] = first_logratio.item()  # max |log r| before this batch's first step
        stats |= dict(lr=opt.param_groups[0]["lr"], p_concept_forget=p[is_forget.to(p.device), 0].mean().item())
        stats |= dict(reward_forget=rewards[is_forget].mean().item(), reward_retain=rewards[~is_forget].mean().item())
        dt = lap("policy", t_lap) - t0
        iter_time, window, train_time = iter_time + dt, window + 1, train_time + dt
        clock.tick(step - start)

        # PLUMBING: logging, samples, checkpoints
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            values_log = dict(**stats, rollouts=done * B, sec_per_step=iter_time / window)
            iter_time, window = 0.0, 0
            common.log_metrics(run, done, values_log)
            tqdm.write(f"rl_critic step {done}/{args.steps} " + " ".join(f"{k} {v:.4g}" for k, v in values_log.items()))
        if args.sample_every and done % args.sample_every == 0 and done < args.steps:
            samples()
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save(done)
    save(args.steps)
    samples()

    # PLUMBING: timing summary. Efficiency = time per iteration / time of the UNet passes it needs (pass_sets)
    n_iter = args.steps - start
    n_upd = n_iter - max(0, min(args.critic_warmup, args.steps) - start) if args.advantage != "none" else n_iter
    per_iter = T * clock.seconds("rollout") + (T * clock.seconds("clean") if args.critic_input == "clean" else 0.0)
    per_iter += T_train * clock.seconds("kl") if n_kl else 0.0
    unet_time = n_iter * per_iter + n_upd * args.inner_epochs * args.num_minibatches * T_train * clock.seconds("update")
    summary = dict(wall_seconds=time.perf_counter() - t_start, train_seconds=train_time, steps=n_iter)
    summary |= dict(rollouts=n_iter * B, sec_per_step=train_time / max(1, n_iter), unet_pass_seconds=unet_time)
    summary |= dict(step_efficiency=train_time / unet_time if unet_time > 0 else None, phase_seconds=phases)
    summary |= dict(
        peak_memory_mb=common.peak_memory_mb(model.device), critic_explained_variance=critic_report(ev_log, args.steps)
    )
    common.save_json(os.path.join(run, "summary.json"), summary)
    print(
        f"rl_critic: done in {summary['wall_seconds']:.0f} s ({train_time:.0f} s for {n_iter} iterations; time per "
        f"step / its UNet passes = {common.fmt(summary['step_efficiency'])}); peak {summary['peak_memory_mb']:.0f} MB; "
        f"run in {run}; seconds per phase: " + ", ".join(f"{k} {v:.1f}" for k, v in summary["phase_seconds"].items())
    )
    return run


if __name__ == "__main__":
    common.cli(main, parse_args())
