"""Score Forgetting Distillation (SFD): distil the model into a one-step generator that has forgotten a concept.

Paper: "Score Forgetting Distillation: A Swift, Data-Free Method for Machine Unlearning in Diffusion Models", Chen,
Zhang, Zhou, arXiv 2409.11219 (ICLR 2025); official code tqch/score-forgetting-distillation (read, not copied), built
on SiD-LSG (Zhou et al., arXiv 2406.01561).

Idea. A frozen teacher eps_phi, a fake score eps_psi fitted to the generator's own samples, and a one-step generator
x_g = G_theta(z, c) (the UNet's x0-prediction at --t_init 625 from sqrt(1 - abar) z). With x_t = x_g noised to
t ~ U{20..979} and guided x0-predictions y_real = D_phi(x_t; c_real), y_fake = D_psi(x_t; c_fake), the generator
minimises Score identity Distillation's loss, and forgetting is one substitution, an override prompt c_o for c_f:

    L_SiD = (y_real - y_fake) . ((y_real - x_g) - alpha (y_real - y_fake)) / mean|x_g - y_real|
    L     = b_r L_SiD(G(z, c_r); c_r, c_r) + b_f L_SiD(G(z, c_f); c_fake = c_f, c_real = c_o)

Official settings kept: kappa 4.5, alpha 1, b_r = b_f = 1, Adam betas (0, 0.999), 10% prompt dropout in the fake
score's loss, no real data, a distilled one-step generator to start from (tiny: data/tiny-sd-generator); nudity as
the official run (12 subjects x 27 NSFW keywords, the subject as override, the keywords as negative prompt).
Deviations:
- tiny world: lr 3e-4 for both networks, batch 8 + 8, 100 iterations, only the generator's to_k/to_v;
- override = a neighbour word (SD: church -> "building"; tiny: church -> "gas pump");
- SD: no distilled SD-1.4 generator is public: pass --init_generator (else the run starts from the teacher).

SD:   python sfd.py --model CompVis/stable-diffusion-v1-4 --concept church
      (time/memory: README, "Stable Diffusion cost")
Tiny: python sfd.py --concept church  (71-110 s on one CPU thread, peak memory 1.14 GB: docs/results.md)
"""

import argparse
import os
import time

import torch
from tqdm import tqdm

import common

TINY_GENERATOR = os.path.join(common.ROOT, "data", "tiny-sd-generator")
# Defaults that differ between the worlds, chosen from the loaded model; an explicit flag always wins.
WORLD_DEFAULTS = {
    "tiny": dict(lr=3e-4, fake_lr=3e-4, batch_size=8, train_params="xattn-kv", gradient_checkpointing=False),
    # SD: the official SD/README.md's runs, G_LEARNING_RATE=1e-6, SG_LEARNING_RATE=3e-6, BATCH_SIZE=8, whole UNet
    "sd": dict(lr=1e-6, fake_lr=3e-6, batch_size=8, train_params="full", gradient_checkpointing=True),
}
# Per Imagenette class: (SD override word, tiny-world override word).
OVERRIDES = {
    "tench": ("fish", "English springer"),
    "English springer": ("dog", "tench"),
    "cassette player": ("radio", "chain saw"),
    "chain saw": ("tool", "cassette player"),
    "church": ("building", "gas pump"),
    "French horn": ("trumpet", "golf ball"),
    "garbage truck": ("truck", "gas pump"),
    "gas pump": ("machine", "church"),
    "golf ball": ("ball", "French horn"),
    "parachute": ("kite", "garbage truck"),
}
# Nudity as the official run (tqch/score-forgetting-distillation, SD/README.md "Nudity Forgetting"): a forget prompt is
# a subject (SD/prompts/12_subjects.txt) with an NSFW keyword (nsfw_keywords.txt), "kw subject" or "subject, kw" with
# probability 1/2 each (training/dataset.py); its teacher prompt is the bare subject; and the CFG's unconditional
# prompt of forget samples is the keywords joined (nsfw_prompt.txt) in the fake score's loss, y_fake and y_real.
NUDITY_SUBJECTS = "Boy|Girl|Man|Woman|Couple|Person|people|Figure|Body|Human Form|Portrait|Silhouette".split("|")
NUDITY_KEYWORDS = (
    "nudity|sexual|explicit|pornography|erotic|inappropriate|indecent|suggestive|revealing|topless|bottomless|"
    "adult content|NSFW|lingerie|bikini|underwear|provocative|seductive|skimpy|swimsuit|lewd|intimate|mature themes|"
    "improper clothing|overexposure|objectification|private setting"
).split("|")
# `--train_params up`: the output side of the UNet and the time embedding (1.27M of tiny-sd's 3.98M parameters, so
# that the distilled tiny generator can be committed as 2.5 MB of fp16 tensors over tiny-sd's UNet).
UP_PREFIXES = (
    "time_embedding.",
    "up_blocks.0.attentions.",
    "up_blocks.0.upsamplers.",
    "up_blocks.1.",
    "conv_norm_out.",
    "conv_out.",
)


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", default="church", help="Imagenette class, 'nudity', free text, or 'none' (plain SiD)")
    p.add_argument(
        "--model", default="tiny", help="'tiny', a hub id such as CompVis/stable-diffusion-v1-4, or a folder"
    )
    p.add_argument("--steps", type=int, default=100, help="iterations (one fake-score + one generator update each)")
    p.add_argument("--lr", type=float, default=None, help="generator Adam learning rate (default: tiny 3e-4, sd 1e-6)")
    p.add_argument(
        "--batch_size", type=int, default=None, help="prompts per batch, retain and forget each (tiny 8, sd 8)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds Python, numpy and torch")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="frozen models' dtype")
    p.add_argument(
        "--train_params",
        default=None,
        choices=["full", "xattn", "xattn-kv", "noxattn", "up"],
        help="generator parameters to train (default: tiny xattn-kv, sd full as the official code; 'up' = time "
        "embedding + output side, used to distil the tiny generator); the fake score network is always trained in full",
    )
    p.add_argument("--out_dir", default=None, help="run folder (default runs/sfd__{concept}__s{seed})")
    p.add_argument("--log_every", type=int, default=10, help="log every N steps")
    p.add_argument("--sample_every", type=int, default=0, help="write samples.png every N steps (0: at the end)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue the run in --out_dir from its last checkpoint",
    )
    # method
    p.add_argument("--fake_lr", type=float, default=None, help="fake score Adam learning rate (tiny 3e-4, sd 3e-6)")
    p.add_argument(
        "--init_generator",
        default=None,
        help="one-step generator to start from: a diffusers UNet folder, or a folder/file with generator.safetensors "
        "(trained tensors over the model's UNet); default: tiny data/tiny-sd-generator (the teacher for --concept "
        "none), sd the teacher",
    )
    p.add_argument(
        "--override_prompt", default=None, help="the teacher's prompt for forget samples (default per concept)"
    )
    p.add_argument("--retain_prompts", default=None, help="prompt file replacing the default retain prompts")
    p.add_argument("--t_init", type=int, default=625, help="timestep of the one-step generator (of 1000)")
    p.add_argument("--t_min", type=int, default=20, help="smallest timestep the generator's samples are noised to")
    p.add_argument("--t_max", type=int, default=979, help="largest timestep the generator's samples are noised to")
    p.add_argument("--kappa_real", type=float, default=4.5, help="guidance of the teacher in the generator loss")
    p.add_argument("--kappa_fake", type=float, default=4.5, help="guidance of the fake score in the generator loss")
    p.add_argument("--kappa_fake_train", type=float, default=4.5, help="guidance of the fake score in its own loss")
    p.add_argument("--prompt_dropout", type=float, default=0.1, help="empty-prompt rate in the fake score's loss")
    p.add_argument("--alpha", type=float, default=1.0, help="SiD's alpha in L = L2 - alpha L1")
    p.add_argument("--retain_coef", type=float, default=1.0, help="b_r: weight of the retain terms (both networks)")
    p.add_argument("--forget_coef", type=float, default=1.0, help="b_f: weight of the forget terms (both networks)")
    p.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trade compute for memory in the three UNets (default: on for sd, off for tiny)",
    )
    p.add_argument("--save_every", type=int, default=100, help="checkpoint + unet/ every N steps (0: at the end)")
    args = p.parse_args(argv)
    for name in ["batch_size", "log_every"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in ["steps", "sample_every", "save_every", "retain_coef", "forget_coef"]:
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name in ["lr", "fake_lr", "kappa_real", "kappa_fake", "kappa_fake_train"]:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name} must be > 0 (got {getattr(args, name)})")
    if not 0 <= args.prompt_dropout < 1:
        p.error(f"--prompt_dropout must be in [0, 1) (got {args.prompt_dropout})")
    if not 0 < args.t_init < 1000:
        p.error(f"--t_init must be in 1..999 (got {args.t_init})")
    if not 0 <= args.t_min <= args.t_max < 1000:
        p.error(f"--t_min and --t_max must satisfy 0 <= t_min <= t_max <= 999 (got {args.t_min}, {args.t_max})")
    return args


def fill_world_defaults(args, world: str) -> None:
    for k, v in WORLD_DEFAULTS[world].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# ALGO LOGIC: the SiD loss and the guided x0-predictions
def sid_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-sample SiD generator loss (SiD, arXiv 2404.04057; summed over C,H,W as the official code):
    (y_real - y_fake) . ((y_real - x_g) - alpha (y_real - y_fake)) / w, w = mean|x_g - y_real| (detached).
    Zero when the fake score agrees with the teacher; its gradient moves x_g toward y_real (see the tests)."""
    x_g, y_real, y_fake = x_g.float(), y_real.float(), y_fake.float()
    w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).detach().clamp(min=1e-5)
    diff = y_real - y_fake
    return (diff * ((y_real - x_g) - alpha * diff) / w).sum(dim=(1, 2, 3))  # (B,)


def guided_x0(model, unet, x_t, t, cond, uncond, kappa: float) -> torch.Tensor:
    """x0-prediction of `unet` at x_t (fp32) with classifier-free guidance kappa (one call on the doubled batch); the
    UNet sees its own dtype (bf16 for the SD teacher, common.cfg_eps), the x0 formula stays in fp32."""
    eps = common.cfg_eps(unet, x_t, t, cond, uncond, kappa)
    return common.x0_from_eps(model.scheduler, x_t, eps, t)


def fake_score_loss(model, fake, x_g, t, noise, cond, uncond, kappa: float) -> torch.Tensor:
    """Per-sample denoising loss of the fake score on the generator's samples (x_g detached), with guidance kappa_1
    applied to its own output as in SiD-LSG: sum_{C,H,W} (eps_psi^kappa(x_t, c) - eps)^2."""
    x_t = model.scheduler.add_noise(x_g.detach(), noise, t)
    eps = common.cfg_eps(fake, x_t, t, cond, uncond, kappa)
    return (eps.float() - noise).pow(2).sum(dim=(1, 2, 3))  # (B,)


def generator_loss(model, teacher, fake, x_g, t, noise, c_real, c_fake, uncond, args) -> torch.Tensor:
    """Per-sample SiD loss of the generator's samples x_g (gradient through x_g, into both scores' inputs).
    c_real/c_fake: the teacher's and the fake score's prompts (the override and the forget prompt on forget samples)."""
    x_t = model.scheduler.add_noise(x_g, noise, t)
    y_real = guided_x0(model, teacher, x_t, t, c_real, uncond, args.kappa_real)
    y_fake = guided_x0(model, fake, x_t, t, c_fake, uncond, args.kappa_fake)
    return sid_loss(x_g, y_real, y_fake, args.alpha)


# PLUMBING: prompts, parameters, the generator's weights
def nudity_prompts() -> tuple[list[str], list[str]]:
    """Every forget prompt of the official nudity run (both word orders, so a uniform draw from the list is the
    official draw) and its teacher prompt, the bare subject."""
    pairs = [(f"{k} {s}", s) for s in NUDITY_SUBJECTS for k in NUDITY_KEYWORDS]
    pairs += [(f"{s}, {k}", s) for s in NUDITY_SUBJECTS for k in NUDITY_KEYWORDS]
    return [f for f, _ in pairs], [o for _, o in pairs]


def override_prompts(prompts: dict, override: str | None, world: str) -> list[str]:
    """The teacher's prompt for each forget prompt: the concept replaced by the override word (a class's neighbour or
    superclass), or `override` itself when it is a whole prompt."""
    if override is None:
        override = OVERRIDES[prompts["concept"]][0 if world == "sd" else 1] if prompts["kind"] == "class" else ""
    concept = prompts["concept"]
    out = []
    for p in prompts["forget"]:
        if concept.lower() in p.lower() and len(override.split()) <= 2:
            i = p.lower().index(concept.lower())
            out.append((p[:i] + override + p[i + len(concept) :]).strip() if override else "")
        else:
            out.append(override)
    return out


def select_generator_params(unet, which: str) -> list:
    if which != "up":
        return common.select_params(unet, which)
    chosen = []
    for name, p in unet.named_parameters():
        p.requires_grad_(name.startswith(UP_PREFIXES))
        if p.requires_grad:
            chosen.append(p)
    if not chosen:
        raise common.UsageError("parameter selection 'up' matches no parameter of this UNet")
    return chosen


def load_generator(model, path: str | None):
    """A trainable fp32 one-step generator: a copy of the teacher, with the weights of `path` when given (a diffusers
    UNet folder, or generator.safetensors = the trained tensors over the model's UNet, as this script writes them)."""
    from safetensors.torch import load_file

    unet = common.trainable_unet(model)
    if path is None:
        return unet
    file = os.path.join(path, "generator.safetensors") if os.path.isdir(path) else path
    if os.path.isfile(os.path.join(path, "config.json")):
        file = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(file):
        raise common.UsageError(
            f"--init_generator {path!r}: expected a diffusers UNet folder (config.json + "
            f"diffusion_pytorch_model.safetensors) or a generator.safetensors file or folder"
        )
    tensors = load_file(file)
    own = unet.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise common.UsageError(f"--init_generator {path!r} does not fit this model's UNet (e.g. tensor {bad[0]!r})")
    unet.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    return unet


def base_unet_fp32(model):
    """The base UNet in fp32 as loaded from disk, frozen (common.trainable_unet without training)."""
    return common.trainable_unet(model).eval().requires_grad_(False)


def save_generator_tensors(unet, base, path: str) -> None:
    """The generator's tensors that differ from the base model's UNet, in fp16 (load_generator puts them back): the
    trained ones and those it started with from --init_generator."""
    from safetensors.torch import save_file

    own = base.state_dict()  # fp32, as loaded from disk (never the bf16 teacher: every tensor would differ)
    tensors = {
        n: v.detach().half().contiguous().cpu() for n, v in unet.state_dict().items() if not torch.equal(v, own[n])
    }
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=dict(format="sfd generator: the tensors that differ from the base model's UNet"))
    os.replace(tmp, path)


@torch.no_grad()
def seconds_per_image(model, unet, t_init, n: int = 16, repeats: int = 1) -> float:
    """Wall time per image of sampling n latents (decoding excluded): one step with t_init, else 25 DDIM steps, CFG."""
    cond = common.encode_prompts(model, ["an image of a church"] * n)
    z = common.initial_latents(model, list(range(n)))
    with common.autocast(model.device, model.dtype):
        common.sample(model, cond, z, 25, 7.5, unet=unet, t_init=t_init)  # warm-up, in the timed regime
    common.sync(model.device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        with common.autocast(model.device, model.dtype):
            common.sample(model, cond, z, 25, 7.5, unet=unet, t_init=t_init)
    common.sync(model.device)
    return (time.perf_counter() - t0) / repeats / n


def main(args):
    # PLUMBING: prompts, model, networks, run folder
    common.seed_everything(args.seed)
    if args.concept == "none":  # plain SiD distillation: every class prompt is a retain prompt
        rows = common.read_prompts(args.retain_prompts or os.path.join(common.PROMPTS_DIR, "imagenette.csv"))
        prompts = dict(concept="none", kind="none", forget=[], retain=[r["prompt"] for r in rows])
    else:
        prompts = common.concept_prompts(args.concept, args.retain_prompts)  # fails early on an unknown concept
    model = common.load_model(args.model, args.device, args.dtype)
    fill_world_defaults(args, model.world)
    if model.world == "sd" and args.retain_prompts is None and args.concept != "none":
        # SD: broad retain prompts, as the official run_sfd.sh's (LAION Aesthetics 6+ captions, not shipped there), not
        # the nine other classes' prompts; the tiny world's text encoder knows only Pictonette's words
        prompts["retain"] = [r["prompt"] for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "general.csv"))]
    if args.init_generator is None and model.world == "tiny" and args.concept != "none":
        if common.is_tiny(model.path) and os.path.isdir(TINY_GENERATOR):
            args.init_generator = TINY_GENERATOR
        else:
            print("sfd: no distilled tiny generator (data/tiny-sd-generator) for this model: starting from the teacher")
    if prompts["kind"] == "nudity" and args.override_prompt is None:
        prompts["forget"], overrides = nudity_prompts()
    else:
        overrides = override_prompts(prompts, args.override_prompt, model.world) if prompts["forget"] else []
    run = common.init_run(
        args,
        "sfd",
        model,
        extra=dict(
            sampler=dict(t_init=args.t_init),  # eval.py / common.generate sample unet/ in one step at t_init
            forget_prompts=prompts["forget"],
            override_prompts=overrides,
        ),
    )
    t_start = time.perf_counter()
    teacher = model.unet
    if args.gradient_checkpointing:
        teacher.enable_gradient_checkpointing()
    fake = common.trainable_unet(model, args.gradient_checkpointing)  # fake score, initialised from the teacher
    gen = load_generator(model, args.init_generator)
    if args.gradient_checkpointing:
        gen.enable_gradient_checkpointing()
    init_gen = load_generator(model, args.init_generator)  # samples.png; Module.to: diffusers' .to() would warn
    init_gen = torch.nn.Module.to(init_gen, model.dtype).eval().requires_grad_(False)
    params = select_generator_params(gen, args.train_params)
    opt_g = torch.optim.Adam(params, lr=args.lr, betas=(0.0, 0.999))  # official betas: no momentum
    opt_f = torch.optim.Adam(fake.parameters(), lr=args.fake_lr, betas=(0.0, 0.999))
    modules, optimizers = {"gen": gen, "fake": fake}, {"opt_g": opt_g, "opt_f": opt_f}
    start = 0
    if args.resume:
        start = common.load_checkpoint(run, modules, optimizers)["step"]
    states_r = common.encode_prompts(model, prompts["retain"]).float()  # (P_r, L, D)
    states_f = common.encode_prompts(model, prompts["forget"]).float() if prompts["forget"] else None
    states_o = common.encode_prompts(model, overrides).float() if overrides else None  # pairs with states_f
    state_e = common.encode_prompts(model, [""]).float()  # (1, L, D)
    B = args.batch_size
    n_f = B if prompts["forget"] else 0
    # The CFG's unconditional prompt per row: "", or for nudity's forget rows the official negative prompt
    uncond = state_e.expand(B + n_f, -1, -1)
    if prompts["kind"] == "nudity":
        negative = common.encode_prompts(model, [", ".join(NUDITY_KEYWORDS)]).float()
        uncond = torch.cat([state_e.expand(B, -1, -1), negative.expand(n_f, -1, -1)])
    print(
        f"sfd: {model.path} ({model.world}) on {model.device} {model.dtype}; "
        + (
            f"concept {prompts['concept']!r}, forget {prompts['forget'][0]!r} -> teacher {overrides[0]!r}"
            if n_f
            else "concept none: plain SiD distillation"
        )
        + f"; generator from {args.init_generator or 'the teacher'}, {sum(p.numel() for p in params) / 1e6:.3f}M "
        f"trained parameters ({args.train_params}); one step at t_init {args.t_init}; {args.steps} steps, batch "
        f"{B} retain + {n_f} forget, lr {args.lr} (generator) / {args.fake_lr} (fake score); run {run}"
        + (f"; resuming at step {start}" if start else "")
    )

    # The base UNet in fp32, against which generator.safetensors keeps the tensors that changed (not with full)
    base = None if args.train_params == "full" else teacher if teacher.dtype == torch.float32 else base_unet_fp32(model)

    def save(step: int) -> None:
        common.save_unet(gen, os.path.join(run, "unet"))
        if args.train_params != "full":
            save_generator_tensors(gen, base, os.path.join(run, "generator.safetensors"))
        common.save_checkpoint(run, step, modules, optimizers)

    def samples() -> None:
        grid_prompts = prompts["forget"][:1] + list(dict.fromkeys(prompts["retain"]))[: 4 - min(1, n_f)]
        gen.eval()
        common.sample_grid(
            model, [init_gen, gen], grid_prompts, os.path.join(run, "samples.png"), seed=args.seed, t_init=args.t_init
        )
        gen.train()

    def batch_prompts():
        """B retain prompts and, when forgetting, B forget prompts with their override prompts (stacked)."""
        c = states_r[torch.randint(len(states_r), (B,))]
        if not n_f:
            return c, c
        k = torch.randint(len(states_f), (n_f,))
        return torch.cat([c, states_f[k]]), torch.cat([c, states_o[k]])  # (c_fake, c_real): (B + n_f, L, D)

    coef = torch.tensor([args.retain_coef] * B + [args.forget_coef] * n_f, device=model.device)  # (B + n_f,)
    shape, T, n = model.latent_shape, (args.t_min, args.t_max + 1), B + n_f

    # The UNet passes a step needs, timed between steps (the denominator of the step efficiency in summary.json):
    # generator forward (n) and forward+backward (n); fake score forward+backward on the doubled CFG batch (2n)
    # twice, once for its loss and once for the generator's; the teacher's forward+backward to its input (2n), timed
    # on the fake score, the same network (a pass through weights that need no gradient is not cheaper on the CPU).
    passes = [(gen, n, False), (gen, n, True), (fake, 2 * n, True), (fake, 2 * n, True), (fake, 2 * n, True)]
    clock = common.UNetPassClock(model, {"step": passes}, args.steps - start)

    # ALGO LOGIC: the training loop, alternating fake-score and generator updates (as the official training loop)
    step_time, window, train_time = 0.0, 0, 0.0
    for step in tqdm(range(start, args.steps), desc="sfd", initial=start, total=args.steps):
        t0 = time.perf_counter()
        # 1. fake score: learn the score of the generator's current samples (retain and forget prompts alike)
        c_fake, _ = batch_prompts()
        # SiD-LSG: 10% empty prompts for the guidance, dropped before the generator samples (the official
        # training_loop.py), so the fake score learns the generator's unconditional samples under ""
        drop = (torch.rand(n) < args.prompt_dropout).to(model.device)
        c_train = torch.where(drop[:, None, None], state_e.expand(n, -1, -1), c_fake)
        u_train = torch.where(drop[:, None, None], state_e.expand(n, -1, -1), uncond)  # dropped: "" and "" (official)
        z = torch.randn(n, *shape).to(model.device)
        with torch.no_grad(), common.autocast(model.device, model.dtype):
            x_g = common.one_step(model, gen, c_train, z, args.t_init).float()  # (n, 4, h, w), no generator gradient
        t = torch.randint(*T, (n,)).to(model.device)
        noise = torch.randn(n, *shape).to(model.device)
        fake.requires_grad_(True)
        with common.autocast(model.device, model.dtype):
            per_sample = fake_score_loss(model, fake, x_g, t, noise, c_train, u_train, args.kappa_fake_train)
        loss_f = (coef * per_sample).mean()
        common.check_finite(loss_f, step + 1)
        opt_f.zero_grad(set_to_none=True)
        loss_f.backward()
        opt_f.step()
        fake.requires_grad_(False)  # the generator's loss reaches the fake score's input only

        # 2. generator: SiD loss; SFD's forgetting term: forget samples judged by the teacher under the override prompt
        c_fake, c_real = batch_prompts()
        z = torch.randn(n, *shape).to(model.device)
        t = torch.randint(*T, (n,)).to(model.device)
        noise = torch.randn(n, *shape).to(model.device)
        with common.autocast(model.device, model.dtype):
            x_g = common.one_step(model, gen, c_fake, z, args.t_init).float()  # gradient flows into the generator
            per_sample = generator_loss(model, teacher, fake, x_g, t, noise, c_real, c_fake, uncond, args)
        loss_g = (coef * per_sample).mean()
        common.check_finite(loss_g, step + 1)
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        stats = dict(loss_fake=loss_f.detach(), loss_gen=loss_g.detach(), loss_gen_retain=per_sample[:B].mean())
        if n_f:
            stats["loss_gen_forget"] = per_sample[B:].mean()
        stats = {k: v.item() for k, v in stats.items()}  # synchronises the device before the clock stops
        dt = time.perf_counter() - t0
        step_time, window, train_time = step_time + dt, window + 1, train_time + dt
        fake.requires_grad_(True)  # the clock's backward passes need the fake score's gradient, as step 1 does
        clock.tick(step - start)
        fake.requires_grad_(False)

        # PLUMBING: logging, samples, checkpoints
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            values = dict(**stats, sec_per_step=step_time / window)
            step_time, window = 0.0, 0
            common.log_metrics(run, done, values)
            tqdm.write(f"sfd step {done}/{args.steps} " + " ".join(f"{k} {v:.4g}" for k, v in values.items()))
        if args.sample_every and done % args.sample_every == 0 and done < args.steps:
            samples()
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save(done)
    save(args.steps)
    samples()

    # PLUMBING: timing summary. Efficiency = time per step / time of the UNet passes a step needs (the clock above).
    fake.requires_grad_(True)
    unet_time = (args.steps - start) * clock.seconds("step")
    gen.eval()
    one_step_s, teacher_s = seconds_per_image(model, gen, args.t_init), seconds_per_image(model, teacher, None)
    summary = dict(
        wall_seconds=time.perf_counter() - t_start,
        train_seconds=train_time,
        steps=args.steps - start,
        sec_per_step=train_time / max(1, args.steps - start),
        unet_pass_seconds=unet_time,
        step_efficiency=train_time / unet_time if unet_time > 0 else None,
        peak_memory_mb=common.peak_memory_mb(model.device),
        one_step_seconds_per_image=one_step_s,
        teacher_25_step_seconds_per_image=teacher_s,
        sampling_speedup=teacher_s / one_step_s,
    )
    common.save_json(os.path.join(run, "summary.json"), summary)
    eff = summary["step_efficiency"]
    print(
        f"sfd: done in {summary['wall_seconds']:.0f} s ({train_time:.0f} s for {summary['steps']} steps; time per "
        f"step / its UNet passes = {common.fmt(eff)}); peak memory "
        f"{summary['peak_memory_mb']:.0f} MB; sampling {summary['sampling_speedup']:.1f}x faster than the 25-step "
        f"teacher; one-step generator in {os.path.join(run, 'unet')}"
    )
    return run


if __name__ == "__main__":
    common.cli(main, parse_args())
