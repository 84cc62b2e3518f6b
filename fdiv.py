"""f-divergence unlearning (f-DMU), with ESD as a special case.

Paper: "A Unified Framework for Diffusion Model Unlearning with f-Divergence", Novello et al., arXiv 2509.21167;
official code nicolaNovello/f-DMU (read, not copied). Built on Concept Ablation (Kumari et al. 2023).

Idea. Prompted with the concept, the trained model must act like the frozen model prompted with an anchor, on the
same noisy latent: min D_f( p_ref(x_{t-1} | x_t, c_a) || p_theta(x_{t-1} | x_t, c_f) ). The two reverse kernels are
Gaussians of equal variance, so with m = sum_C mean_{H,W} (eps_ref(x_t, c_a, t) - eps_theta(x_t, c_f, t))^2 (target
detached; the official normalisation) each divergence is a function of m, and f sets how hard errors push:

    mse m (= kl up to scale),  hellinger -exp(-m / (8 sigma^2)),  pearson_chi2 exp(m / sigma^2),
    total_variation 2 Phi(sqrt(m) / (2 sigma)) - 1;  --variational: any f (jensen_shannon too) by the f-GAN bound

--anchor esd makes the target ESD's negatively guided reference eps_ref(x_t, c_f) - eta (eps_ref(x_t, c_f) -
eps_ref(x_t, "")) (official esd_sd.py; Gandikota et al., arXiv 2303.07345, eq. 2 with eta - 1) at ESD's own x_t, a
partial sample of the concept by the pipeline's scheduler: with --divergence mse, ESD. Deviations:
- the default anchor is a neighbour word per class (SD: church -> "building"; tiny: church -> "gas pump");
- only cross-attention to_k/to_v trains (xattn-kv, as the official code), ESD too (ESD-u: --train_params noxattn);
- ESD: x_t from all the forget prompts (esd_sd.py: the one prompt given); AdamW wd 1e-2 (esd_sd.py: Adam).
Tiny world: at sigma 1 (official) m / sigma^2 < 0.1 and the closed forms train one model (docs/results.md).

SD:   python fdiv.py --model CompVis/stable-diffusion-v1-4 --concept church
      (time/memory: README, "Stable Diffusion cost")
Tiny: python fdiv.py --concept church  (27 s on one CPU thread, peak memory 1.11 GB: docs/results.md)
"""

import argparse
import copy
import inspect
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# Defaults that differ between the worlds, chosen from the loaded model; an explicit flag always wins.
WORLD_DEFAULTS = {
    "tiny": dict(steps=200, lr=1e-3, batch_size=16, gen_steps=25, gradient_checkpointing=False),
    # SD: the official run_experiment.sh (nicolaNovello/f-DMU): --max_train_steps 500; --learning_rate 7e-5 with
    # --scale_lr, which multiplies it by gradient accumulation (2) x batch (2) x GPUs (1) in train.py: 2.8e-4; batch 2
    # x accumulation 2 = 4 images per update, here one batch of 4.
    "sd": dict(steps=500, lr=2.8e-4, batch_size=4, gen_steps=50, gradient_checkpointing=True),
}
# Per Imagenette class: (SD anchor word, tiny-world anchor word: another class, as the tiny vocabulary has only the
# dataset's words; garbage truck -> cassette player, as gas pump cost three other classes 6-12 points each).
ANCHORS = {
    "tench": ("fish", "English springer"),
    "English springer": ("dog", "tench"),
    "cassette player": ("radio", "chain saw"),
    "chain saw": ("tool", "cassette player"),
    "church": ("building", "gas pump"),
    "French horn": ("trumpet", "golf ball"),
    "garbage truck": ("truck", "cassette player"),
    "gas pump": ("machine", "church"),
    "golf ball": ("ball", "French horn"),
    "parachute": ("kite", "garbage truck"),
}
# ESD's partial sampling (rohitgandikota/erasing, esd_sd.py): x_t is the frozen model's own sample of the concept after
# a random number of its 50 steps at guidance 3, a fresh seed every iteration, one image per iteration.
ESD_STEPS, ESD_GUIDANCE, ESD_BATCH = 50, 3.0, 1
DIVERGENCES = ["mse", "hellinger", "pearson_chi2", "total_variation", "jensen_shannon", "kl", "reverse_kl"]


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="church", help="Imagenette class, 'nudity', or free text")
    p.add_argument(
        "--model", default="tiny", help="'tiny', a hub id such as CompVis/stable-diffusion-v1-4, or a folder"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps, one update each (tiny 200, sd 500)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: tiny 1e-3, sd 2.8e-4)")
    p.add_argument(
        "--batch_size", type=int, default=None, help="images per step (default: tiny 16, sd 4; ESD's sampling 1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds Python, numpy, torch and the cached sets")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="frozen models' dtype")
    p.add_argument(
        "--train_params",
        default=None,
        choices=["full", "xattn", "xattn-kv", "noxattn"],
        help="UNet parameters to train (ESD's groups; default xattn-kv = cross-attention to_k/to_v as the "
        "official code, also with --anchor esd; ESD's paper uses noxattn for objects and nudity)",
    )
    p.add_argument("--out_dir", default=None, help="run folder (default runs/fdiv__{concept}__s{seed})")
    p.add_argument("--log_every", type=int, default=10, help="log every N steps")
    p.add_argument("--sample_every", type=int, default=0, help="write samples.png every N steps (0: at the end)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue the run in --out_dir from its last checkpoint",
    )
    # method
    p.add_argument("--divergence", default="hellinger", choices=DIVERGENCES, help="the f-divergence")
    p.add_argument(
        "--variational",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="estimate the divergence with a discriminator (f-GAN bound) instead of its closed form",
    )
    p.add_argument("--sigma", type=float, default=1.0, help="std of the two Gaussian kernels in the closed forms")
    p.add_argument(
        "--anchor",
        default=None,
        help="anchor word replacing the concept in its prompts ('' = empty "
        "prompt), a whole prompt, or 'esd' (negatively guided target); default: a neighbour per concept",
    )
    p.add_argument("--negative_guidance", type=float, default=2.0, help="eta of --anchor esd (2: esd_sd.py's default)")
    p.add_argument(
        "--esd_xt",
        default="sample",
        choices=["sample", "cached"],
        help="--anchor esd's x_t: sample = ESD's own, the frozen model's partial sample of the concept by its "
        "scheduler (a random "
        f"number of {ESD_STEPS} steps at guidance {ESD_GUIDANCE:g}, a fresh seed per step, batch {ESD_BATCH} unless "
        "--batch_size); cached = one of the cached concept images noised to a random t (faster)",
    )
    p.add_argument("--num_anchor_samples", type=int, default=50, help="anchor images generated once by the reference")
    p.add_argument(
        "--prior_loss_weight",
        type=float,
        default=0.0,
        help="weight of the denoising loss on retain images, with gradient surgery (0: no prior preservation)",
    )
    p.add_argument("--num_retain_samples", type=int, default=45, help="retain images for --prior_loss_weight")
    p.add_argument("--disc_lr", type=float, default=2e-4, help="discriminator learning rate (--variational)")
    p.add_argument("--disc_warmup_steps", type=int, default=20, help="discriminator-only steps first (--variational)")
    p.add_argument(
        "--gen_steps", type=int, default=None, help="DDIM steps for cached sets and samples (tiny 25, sd 50)"
    )
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance for the cached sets")
    p.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trade compute for memory in the trained UNet (default: on for sd, off for tiny)",
    )
    p.add_argument("--save_every", type=int, default=100, help="checkpoint + unet/ every N steps (0: at the end)")
    args = p.parse_args(argv)
    for name in ["steps", "batch_size", "log_every", "num_anchor_samples", "num_retain_samples", "gen_steps"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in ["sample_every", "save_every", "prior_loss_weight", "disc_warmup_steps", "negative_guidance"]:
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name in ["lr", "sigma", "disc_lr"]:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name} must be > 0 (got {getattr(args, name)})")
    if not args.variational and args.divergence not in CLOSED_FORMS:
        p.error(
            f"--divergence {args.divergence} has no closed form; add --variational "
            f"(closed forms: {', '.join(CLOSED_FORMS)})"
        )
    return args


def fill_world_defaults(args, world: str) -> None:
    if args.batch_size is None and args.anchor == "esd" and args.esd_xt == "sample":
        args.batch_size = ESD_BATCH
    for k, v in WORLD_DEFAULTS[world].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# ALGO LOGIC: the divergences
def _tv(m, s):
    z = m.clamp(min=1e-12).sqrt() / (2 * s)  # clamp: d sqrt(m)/dm is infinite at m = 0
    return torch.erf(z / math.sqrt(2))  # 2 Phi(z) - 1


# Loss as a function of m (the per-sample mean squared distance of the two kernels' means) and sigma. For two
# Gaussians N(mu, s^2) at squared distance d^2 = m: KL = m / (2 s^2); the Hellinger divergence int (sqrt p - sqrt q)^2
# = 2 - 2 exp(-m / (8 s^2)), so the loss is (divergence / 2 - 1); Pearson chi^2 = exp(m / s^2) - 1, so the loss is
# chi^2 + 1; total variation (1/2) int |p - q| = 2 Phi(d / (2 s)) - 1.
CLOSED_FORMS = {
    "mse": lambda m, s: m,
    "kl": lambda m, s: m / (2 * s**2),
    "reverse_kl": lambda m, s: m / (2 * s**2),
    "hellinger": lambda m, s: -torch.exp(-m / (8 * s**2)),
    "pearson_chi2": lambda m, s: torch.exp(m / s**2),
    "total_variation": _tv,
}

# f-GAN (Nowozin et al. 2016, Table 2): generator f, output activation g_f and Fenchel conjugate f*, so that
# D_f(P || Q) >= sup_T E_P[T] - E_Q[f*(T)] with T = g_f(V(x)). Keys: f(u), g_f(v), f*(t).
F_GAN = {
    "kl": (lambda u: u * torch.log(u), lambda v: v, lambda t: torch.exp(t - 1)),
    "reverse_kl": (lambda u: -torch.log(u), lambda v: -torch.exp(-v), lambda t: -1 - torch.log(-t)),
    "hellinger": (lambda u: (u.sqrt() - 1) ** 2, lambda v: 1 - torch.exp(-v), lambda t: t / (1 - t)),
    "jensen_shannon": (
        lambda u: -(u + 1) * torch.log((1 + u) / 2) + u * torch.log(u),
        lambda v: math.log(2) + F.logsigmoid(v),
        lambda t: -torch.log(2 - torch.exp(t)),
    ),
    "pearson_chi2": (lambda u: (u - 1) ** 2, lambda v: v, lambda t: t**2 / 4 + t),
    "total_variation": (lambda u: 0.5 * (u - 1).abs(), lambda v: 0.5 * torch.tanh(v), lambda t: t),
}
F_GAN["mse"] = F_GAN["kl"]  # for equal-variance Gaussians the MSE is the KL up to scale
# f*(g_f(v)) where composing the two overflows in fp32 (JS: -log(2 - 2 sigmoid(v)) is inf once sigmoid(v) rounds to 1,
# near v = 17): the same function in a form that stays finite.
F_STAR_OF_G = {
    "jensen_shannon": lambda v: F.softplus(v) - math.log(2),
    "hellinger": torch.expm1,
    "reverse_kl": lambda v: v - 1,
}


def f_star_of_g(v: torch.Tensor, divergence: str) -> torch.Tensor:
    """f*(g_f(v)), elementwise, in fp32."""
    v = v.float()
    if divergence in F_STAR_OF_G:
        return F_STAR_OF_G[divergence](v)
    _, g, f_star = F_GAN[divergence]
    return f_star(g(v))


def closed_form_loss(pred: torch.Tensor, target: torch.Tensor, divergence: str, sigma: float) -> torch.Tensor:
    """Mean over the batch of the divergence's closed form in m (target detached)."""
    return CLOSED_FORMS[divergence](distance(pred, target.detach()), sigma).mean()


def distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """m = sum_C mean_{H,W} (target - pred)^2 per sample, (B, C, H, W) -> (B,): the official flosses.py's normalisation
    (its masked sum over C,H,W divided by the 1-channel mask's sum), so that --sigma means what it means there."""
    return (pred.float() - target.float()).pow(2).mean(dim=(2, 3)).sum(dim=1)


class Discriminator(torch.nn.Module):
    """V: a small spectral-norm conv net on the epsilon-prediction map (B, 4, h, w) -> patch logits (B, 1, h/4, w/4)."""

    def __init__(self, channels: int = 4, width: int = 64):
        super().__init__()
        sn = torch.nn.utils.parametrizations.spectral_norm
        self.net = torch.nn.Sequential(
            sn(torch.nn.Conv2d(channels, width, 3, 1, 1)),
            torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(width, 2 * width, 4, 2, 1)),
            torch.nn.LeakyReLU(0.2),
            sn(torch.nn.Conv2d(2 * width, 2 * width, 4, 2, 1)),
            torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(2 * width, 1, 3, 1, 1),
        )

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        return self.net(eps.float())


def discriminator_loss(v_ref: torch.Tensor, v_theta: torch.Tensor, divergence: str) -> torch.Tensor:
    """Minus the f-GAN bound: E_theta[f*(g_f(V))] - E_ref[g_f(V)] (the discriminator maximises the bound)."""
    return f_star_of_g(v_theta, divergence).mean() - F_GAN[divergence][1](v_ref.float()).mean()


def variational_loss(v_theta: torch.Tensor, divergence: str) -> torch.Tensor:
    """The trained model's side of the bound: -E_theta[f*(g_f(V(eps_theta)))] (as the official code)."""
    return -f_star_of_g(v_theta, divergence).mean()


def esd_target(eps_empty: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ESD's negatively guided target as esd_sd.py computes it: eps_ref(x_t, c_f) - eta (eps_ref(x_t, c_f) -
    eps_ref(x_t, "")), the paper's eq. 2 (eps("") - eta' (eps(c_f) - eps(""))) with eta' = eta - 1."""
    return eps_concept - eta * (eps_concept - eps_empty)


@torch.no_grad()
def esd_xt(model, cond: torch.Tensor, z_T: torch.Tensor, run_till: int, generator) -> tuple[torch.Tensor, int]:
    """ESD's x_t (esd_sd.py): the frozen model's guided sample of the concept after `run_till` of ESD_STEPS steps of
    its pipeline's own scheduler (tiny-sd: DDPM, ancestral; SD-1.4: PNDM), and the timestep that follows them."""
    sched = copy.deepcopy(model.scheduler)  # a multistep scheduler (PNDM) keeps state: a fresh copy per sample
    sched.set_timesteps(ESD_STEPS)
    kw = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    uncond = common.encode_prompts(model, [""]).expand(len(cond), -1, -1)
    x = z_T.float() * sched.init_noise_sigma
    for t in sched.timesteps[:run_till]:
        t_b = torch.full((len(x),), int(t), device=x.device)
        eps = common.cfg_eps(model.unet, sched.scale_model_input(x, t), t_b, cond, uncond, ESD_GUIDANCE)
        x = sched.step(eps, t, x, **kw).prev_sample.float()
    return x, int(sched.timesteps[run_till])


def surgery(params: list, grads_forget: list, grads_prior: list, weight: float) -> None:
    """PCGrad (Yu et al. 2020, eq. 1) per parameter tensor: where the forget gradient conflicts with the prior one
    (negative dot product) drop its component along the prior gradient; then add weight * prior gradient."""
    for p, gf, gp in zip(params, grads_forget, grads_prior):
        if gf is None:
            continue
        if gp is not None:
            dot = (gf * gp).sum()
            if dot < 0:
                gf = gf - dot / gp.pow(2).sum().clamp(min=1e-20) * gp
            gf = gf + weight * gp
        p.grad = gf


def fdiv_targets(ref, x_t, t, c_anchor, c_forget, c_empty, args) -> torch.Tensor:
    """The frozen reference's target on x_t: eps_ref(x_t, c_a), or ESD's negatively guided one (one doubled call)."""
    with torch.no_grad():
        if args.anchor == "esd":
            eps_e, eps_c = ref(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([c_empty, c_forget])).sample.chunk(2)
            return esd_target(eps_e.float(), eps_c.float(), args.negative_guidance)
        return ref(x_t, t, c_anchor).sample.float()


# PLUMBING: prompts and the cached sets
def anchor_prompts(prompts: dict, anchor: str) -> list[str]:
    """Anchor prompt per forget prompt: the concept replaced by the anchor word, or the anchor as a whole prompt when
    the concept word is absent (nudity prompts) or the anchor is longer than a word."""
    concept = prompts["concept"]
    out = []
    for p in prompts["forget"]:
        if concept.lower() in p.lower() and len(anchor.split()) <= 2:
            i = p.lower().index(concept.lower())
            out.append((p[:i] + anchor + p[i + len(concept) :]).strip() if anchor else "")
        else:
            out.append(anchor)
    return out


def default_anchor(prompts: dict, world: str) -> str:
    if prompts["kind"] == "class":
        return ANCHORS[prompts["concept"]][0 if world == "sd" else 1]
    return "a person wearing clothes" if prompts["kind"] == "nudity" else ""


@torch.no_grad()
def make_cached_set(model, prompts: list[str], n: int, seed: int, steps: int, guidance: float, batch: int, desc: str):
    """n clean latents generated by the reference model, prompt i % len(prompts) for image i, seed `seed + i`.
    Returns (latents (n, 4, h, w) fp32, prompt index (n,))."""
    idx = torch.arange(n) % len(prompts)
    out = []
    for i in tqdm(range(0, n, batch), desc=desc):
        j = idx[i : i + batch]
        cond = common.encode_prompts(model, [prompts[k] for k in j.tolist()])
        z_T = common.initial_latents(model, [seed + i + k for k in range(len(j))])
        with common.autocast(model.device, model.dtype):
            out.append(common.sample(model, cond, z_T, steps, guidance).float())
    return torch.cat(out), idx


def cached_sets(model, run: str, source: list[str], retain: list[str], args) -> dict:
    """Images the steps noise (anchor images; concept images for esd) and retain images, made once per run folder."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(run, "cached_sets.safetensors")
    n_a = 0 if args.anchor == "esd" and args.esd_xt == "sample" else args.num_anchor_samples
    n_r = args.num_retain_samples if args.prior_loss_weight > 0 else 0
    if not n_a + n_r:
        return {}
    key = repr(
        dict(
            source=source,
            retain=retain,
            n_a=n_a,
            n_r=n_r,
            seed=args.seed,
            steps=args.gen_steps,
            guidance=args.guidance,
            model=model.path,
        )
    )
    if os.path.exists(path) and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            if f.read() == key:
                return {k: v.to(model.device) for k, v in load_file(path).items()}
    batch, sets = 4 * args.batch_size, {}
    if n_a:
        sets["x_a"], sets["i_a"] = make_cached_set(
            model, source, n_a, args.seed * 1_000_000, args.gen_steps, args.guidance, batch, "anchor set"
        )
    if n_r:
        sets["x_r"], sets["i_r"] = make_cached_set(
            model, retain, n_r, args.seed * 1_000_000 + 500_000, args.gen_steps, args.guidance, batch, "retain set"
        )
    common.atomic_write(path + ".json", lambda f: f.write(key))
    save_file({k: v.cpu().contiguous() for k, v in sets.items()}, path)
    return {k: v.to(model.device) for k, v in sets.items()}


def main(args):
    # PLUMBING: prompts, model, run folder
    prompts = common.concept_prompts(args.concept, None)  # fails early on an unknown concept
    common.seed_everything(args.seed)
    model = common.load_model(args.model, args.device, args.dtype)
    fill_world_defaults(args, model.world)
    if args.anchor is None:
        args.anchor = default_anchor(prompts, model.world)
    esd = args.anchor == "esd"
    if args.train_params is None:
        args.train_params = "xattn-kv"
    anchors = prompts["forget"] if esd else anchor_prompts(prompts, args.anchor)
    run = common.init_run(args, "fdiv", model, extra=dict(forget_prompts=prompts["forget"], anchor_prompts=anchors))
    t_start = time.perf_counter()
    sets = cached_sets(model, run, anchors, prompts["retain"], args)  # esd: images of the concept itself
    t_sets = time.perf_counter() - t_start
    states_a = common.encode_prompts(model, anchors)  # (P, L, D), anchor prompt i pairs with forget prompt i
    states_f = common.encode_prompts(model, prompts["forget"])
    state_e = common.encode_prompts(model, [""])
    states_r = common.encode_prompts(model, prompts["retain"])
    unet = common.trainable_unet(model, args.gradient_checkpointing)
    params = common.select_params(unet, args.train_params)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)  # the official optimizer and weight decay
    modules, optimizers = {"unet": unet}, {"opt": opt}
    disc = None
    if args.variational:
        disc = Discriminator(model.latent_shape[0]).to(model.device)
        opt_d = torch.optim.Adam(disc.parameters(), lr=args.disc_lr, betas=(0.5, 0.999))
        modules["disc"], optimizers["opt_d"] = disc, opt_d
    start = 0
    if args.resume:
        start = common.load_checkpoint(run, modules, optimizers)["step"]
    sampled = esd and args.esd_xt == "sample"  # ESD's own x_t, sampled every step
    n_a, B = len(sets.get("x_a", [])), args.batch_size
    mode = "variational" if args.variational else "closed form"
    print(
        f"fdiv: {model.path} ({model.world}) on {model.device} {model.dtype}; concept {prompts['concept']!r} -> "
        f"{'ESD target, eta ' + str(args.negative_guidance) if esd else repr(anchors[0])}; {args.divergence} "
        f"({mode}); {sum(p.numel() for p in params) / 1e6:.3f}M trained parameters ({args.train_params}); "
        f"{args.steps} steps, batch {B}, lr {args.lr}; "
        + (f"x_t sampled at guidance {ESD_GUIDANCE:g}" if sampled else f"{n_a} cached images")
        + f"; run {run}"
        + (f"; resuming at step {start}" if start else "")
    )

    def save(step: int) -> None:
        common.save_unet(unet, os.path.join(run, "unet"))
        common.save_checkpoint(run, step, modules, optimizers)

    def samples() -> None:
        grid_prompts = prompts["forget"][:1] + list(dict.fromkeys(prompts["retain"]))[:3]
        common.sample_grid(
            model,
            [model.unet, unet],
            grid_prompts,
            os.path.join(run, "samples.png"),
            steps=args.gen_steps,
            guidance=args.guidance,
            seed=args.seed,
        )

    # The UNet passes a step needs, timed between steps (the denominator of the step efficiency in summary.json): one
    # trained forward+backward and one frozen forward on B images, doubled for esd; plus one trained pass with the
    # prior loss. The discriminator of --variational is overhead, not counted.
    passes = [(unet, B, True), (model.unet, 2 * B if esd else B, False)]
    if args.prior_loss_weight > 0:
        passes.append((unet, B, True))
    pass_sets = {"step": passes, "sample": [(model.unet, 2 * B, False)]} if sampled else {"step": passes}
    clock = common.UNetPassClock(model, pass_sets, args.steps - start)

    # ALGO LOGIC: the training loop
    step_time, window, train_time, n_sampled = 0.0, 0, 0.0, 0
    for step in tqdm(range(start, args.steps), desc="fdiv", initial=start, total=args.steps):
        t0 = time.perf_counter()
        if sampled:  # esd_sd.py: x_t = the frozen model's sample of the concept after run_till of its 50 steps
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # a fresh seed per step, resumable
            k = torch.randint(len(states_f), (B,), generator=gen)
            run_till = int(torch.randint(ESD_STEPS, (), generator=gen))
            z_T = torch.randn(B, *model.latent_shape, generator=gen).to(model.device)
            with common.autocast(model.device, model.dtype):
                x_t, t = esd_xt(model, states_f[k], z_T, run_till, gen)
            t = torch.full((B,), t, device=model.device)
            n_sampled += run_till
        else:
            j = torch.randint(n_a, (B,))
            x0, k = sets["x_a"][j], sets["i_a"][j]  # (B, 4, h, w) clean latents and their prompt index
            t = torch.randint(0, model.scheduler.config.num_train_timesteps, (B,)).to(model.device)
            x_t = model.scheduler.add_noise(x0, torch.randn(x0.shape).to(model.device), t)
        c_f, c_a, c_e = states_f[k], states_a[k], state_e.expand(B, -1, -1)
        with common.autocast(model.device, model.dtype):
            target = fdiv_targets(model.unet, x_t.to(model.dtype), t, c_a, c_f, c_e, args)  # (B, 4, h, w)
            pred = unet(x_t, t, c_f.float()).sample
        stats = {}
        if disc is not None:  # one discriminator step: maximise E_ref[T] - E_theta[f*(T)]
            loss_d = discriminator_loss(disc(target), disc(pred.detach()), args.divergence)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            stats["loss_disc"] = loss_d.detach()
            if step < args.disc_warmup_steps:  # warm-up: the discriminator learns before the model moves
                loss = None
            else:
                loss = variational_loss(disc(pred), args.divergence)
        else:
            loss = closed_form_loss(pred, target, args.divergence, args.sigma)
        stats["m"] = distance(pred.detach(), target).mean()
        if loss is not None:
            common.check_finite(loss, step + 1)
            opt.zero_grad(set_to_none=True)
            if args.prior_loss_weight > 0:  # prior preservation: denoise retain images, with gradient surgery
                jr = torch.randint(len(sets["x_r"]), (B,))
                xr, epsr = sets["x_r"][jr], torch.randn(x_t.shape).to(model.device)
                with common.autocast(model.device, model.dtype):
                    pred_r = unet(model.scheduler.add_noise(xr, epsr, t), t, states_r[sets["i_r"][jr]].float()).sample
                loss_prior = (pred_r.float() - epsr).pow(2).mean()
                g_f = torch.autograd.grad(loss, params, retain_graph=False, allow_unused=True)
                g_p = torch.autograd.grad(loss_prior, params, allow_unused=True)
                surgery(params, g_f, g_p, args.prior_loss_weight)
                stats["loss_prior"] = loss_prior.detach()
            else:
                loss.backward()
            opt.step()
            stats["loss"] = loss.detach()
        stats = {k: v.item() for k, v in stats.items()}  # synchronises the device before the clock stops
        dt = time.perf_counter() - t0
        step_time, window, train_time = step_time + dt, window + 1, train_time + dt
        clock.tick(step - start)

        # PLUMBING: logging, samples, checkpoints
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            values = dict(**stats, sec_per_step=step_time / window)
            step_time, window = 0.0, 0
            common.log_metrics(run, done, values)
            tqdm.write(f"fdiv step {done}/{args.steps} " + " ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if args.sample_every and done % args.sample_every == 0 and done < args.steps:
            samples()
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save(done)
    save(args.steps)
    samples()

    # PLUMBING: timing summary. Efficiency = time per step / time of the UNet passes a step needs (the clock above).
    unet_time = (args.steps - start) * clock.seconds("step") + (n_sampled * clock.seconds("sample") if sampled else 0)
    summary = dict(
        wall_seconds=time.perf_counter() - t_start,
        cached_sets_seconds=t_sets,
        train_seconds=train_time,
        steps=args.steps - start,
        sec_per_step=train_time / max(1, args.steps - start),
        unet_pass_seconds=unet_time,
        step_efficiency=train_time / unet_time if unet_time > 0 else None,
        peak_memory_mb=common.peak_memory_mb(model.device),
    )
    common.save_json(os.path.join(run, "summary.json"), summary)
    print(
        f"fdiv: done in {summary['wall_seconds']:.0f} s ({t_sets:.0f} s cached sets, {train_time:.0f} s for "
        f"{summary['steps']} steps; time per step / its UNet passes = {common.fmt(summary['step_efficiency'])}); peak "
        f"memory {summary['peak_memory_mb']:.0f} MB; trained UNet in {os.path.join(run, 'unet')}"
    )
    return run


if __name__ == "__main__":
    common.cli(main, parse_args())
