"""PURE: repair-aware forgetting with a negative-only preference loss, a KL trust region and forget/repair cycles.

Paper: "Repair Aware Forgetting: An Iterative Approach to Unlearning in T2I Diffusion Models", ICLR 2026 submission
5936 (OpenReview BRJserk9XM); not arXiv 2605.25765 (Projection in U-Net Rendering for Erasure). Only the abstract is
public and there is no code: a reconstruction from Diffusion-DPO and NPO.

Idea. Images of the concept, generated once by the frozen reference, are the losing side of a preference pair with no
winner: raise the trained model's denoising error on them relative to the reference, with a weight that saturates
(gradient ascent does not), while a KL trust region on retain images keeps the rest. With l(theta; x, c) =
mean_{C,H,W} ||eps - eps_theta(x_t, c, t)||^2 and Delta = l(theta; x_f, c_f) - l(ref; x_f, c_f) at the same t, eps:

    L_F  = (2/beta) softplus(-(beta/2) Delta)
    L_KL = E_t w(t) ||eps_theta(x_t, c_r, t) - eps_ref(x_t, c_r, t)||^2      (x_r: cached retain images)

Cycles of --forget_steps_per_cycle (10) forget updates, L_F + --kl_weight (30) L_KL, then --repair_steps_per_cycle
(5) repair updates, L_KL; --steps (100) counts forget updates, the paper's "100 steps".
Deviations (choices the abstract leaves open):
- w(t) = the KL weight of the DDPM reverse kernels, mean 1, t drawn in proportion to it (--kl_t_sampling importance);
- only cross-attention to_k/to_v trains; beta 10 (tiny) / 500 (SD, DUO's value); 50 forget images.
Ablations: --forget_loss ga (-Delta/2, NPO's beta -> 0 limit), --kl_weight 0, --repair_steps_per_cycle 0.

SD:   python pure.py --model CompVis/stable-diffusion-v1-4 --concept church
      (time/memory: README, "Stable Diffusion cost")
Tiny: python pure.py --concept church  (51 s on one CPU thread, peak memory 1.14 GB: docs/results.md)
"""

import argparse
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common

# Defaults that differ between the worlds, chosen from the loaded model; an explicit flag always wins.
WORLD_DEFAULTS = {
    "tiny": dict(lr=1e-3, batch_size=16, beta=10.0, gen_steps=25, num_retain_samples=90, gradient_checkpointing=False),
    # SD: no official code; beta 500 is DUO's value for SD-1.4 (Park et al. 2024); lr, batch and counts are ours
    "sd": dict(lr=1e-5, batch_size=4, beta=500.0, gen_steps=50, num_retain_samples=50, gradient_checkpointing=True),
}


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--concept",
        default="church",
        help="Imagenette class (retain = the other classes), 'nudity', or "
        "free text (then --retain_prompts is required)",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (embedded, data/tiny-sd), a hub id such as "
        "CompVis/stable-diffusion-v1-4, or a local diffusers folder",
    )
    p.add_argument("--steps", type=int, default=100, help="forget steps (repair steps come on top)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: tiny 1e-3, sd 1e-5)")
    p.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="forget images per step, and as many retain images (default: tiny 16, sd 4)",
    )
    p.add_argument(
        "--lr_warmup", type=int, default=0, help="updates over which the learning rate rises linearly to --lr (0: none)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds Python, numpy, torch and the cached sets")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="dtype of the frozen models and of autocast (auto: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--train_params",
        default="xattn-kv",
        choices=["full", "xattn", "xattn-kv", "noxattn"],
        help="UNet parameters to train (ESD's groups)",
    )
    p.add_argument("--out_dir", default=None, help="run folder (default runs/pure__{concept}__s{seed})")
    p.add_argument("--log_every", type=int, default=10, help="log every N updates (forget and repair steps alike)")
    p.add_argument("--sample_every", type=int, default=0, help="write samples.png every N updates (0: at the end)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="continue the run in --out_dir from its last checkpoint",
    )
    # method
    p.add_argument(
        "--forget_loss",
        default="npo",
        choices=["npo", "ga"],
        help="npo: (2/beta) softplus(-(beta/2) Delta); ga: -Delta, plain gradient ascent on the denoising error",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="NPO temperature; saturates at Delta ~ 6/beta (default: tiny 10, sd 500)",
    )
    p.add_argument(
        "--kl_weight",
        type=float,
        default=30.0,
        help="lambda: weight of the KL trust region on retain prompts during forget steps (0: none)",
    )
    p.add_argument(
        "--kl_weighting",
        default="true",
        choices=["uniform", "true"],
        help="per-t weight of the KL term: uniform, or the true reverse-kernel KL weight (mean 1 over t)",
    )
    p.add_argument(
        "--kl_t_sampling",
        default="importance",
        choices=["weighted", "importance"],
        help="how the KL term meets w(t): weighted (t uniform, each retain term times w(t)) or importance (t drawn "
        "with probability w(t) / sum w, weight 1: the same expectation without the rare terms weighted up to 77x)",
    )
    p.add_argument(
        "--forget_t_min",
        type=int,
        default=0,
        help="the forget loss draws t from [forget_t_min, T) (0: all t); the low-noise steps are shared by every class",
    )
    p.add_argument("--forget_steps_per_cycle", type=int, default=10, help="K_f: forget steps per cycle")
    p.add_argument(
        "--repair_steps_per_cycle", type=int, default=5, help="K_r: repair steps after each forget block (0: no repair)"
    )
    p.add_argument(
        "--repair_denoise_weight",
        type=float,
        default=0.0,
        help="gamma: weight of the plain denoising loss on retain images in repair steps",
    )
    p.add_argument("--num_forget_samples", type=int, default=50, help="forget images generated once by the reference")
    p.add_argument(
        "--num_retain_samples",
        type=int,
        default=None,
        help="retain images generated once by the "
        "reference, spread evenly over the retain prompts (default: tiny 90, sd 50)",
    )
    p.add_argument(
        "--retain_prompts",
        default=None,
        help="prompt file (case_number,prompt,...) replacing the concept's default retain prompts",
    )
    p.add_argument(
        "--gen_steps",
        type=int,
        default=None,
        help="DDIM steps for the cached sets and samples.png (default: tiny 25, sd 50)",
    )
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance for the cached sets")
    p.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trade compute for memory in the trained UNet (default: on for sd, off for tiny)",
    )
    p.add_argument("--save_every", type=int, default=50, help="checkpoint + unet/ every N updates (0: at the end)")
    args = p.parse_args(argv)
    positive = [
        "steps",
        "batch_size",
        "log_every",
        "forget_steps_per_cycle",
        "num_forget_samples",
        "num_retain_samples",
        "gen_steps",
    ]
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1 (got {getattr(args, name)})")
    for name in [
        "sample_every",
        "repair_steps_per_cycle",
        "save_every",
        "kl_weight",
        "repair_denoise_weight",
        "lr_warmup",
    ]:
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0 (got {getattr(args, name)})")
    for name in ["lr", "beta"]:
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            p.error(f"--{name} must be > 0 (got {getattr(args, name)})")
    if not 0 <= args.forget_t_min < 1000:
        p.error(f"--forget_t_min must be in [0, 1000) (got {args.forget_t_min})")
    if args.retain_prompts is not None and not os.path.isfile(args.retain_prompts):
        p.error(f"--retain_prompts {args.retain_prompts!r} is not a file")
    return args


def fill_world_defaults(args, world: str) -> None:
    for k, v in WORLD_DEFAULTS[world].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


# ALGO LOGIC: the forget loss, the trust region, the schedule
def forget_loss(delta: torch.Tensor, beta: float, kind: str = "npo") -> torch.Tensor:
    """Per-sample forget loss of Delta = l(theta; x_f, c_f) - l(ref; x_f, c_f), shape (B,) -> (B,).

    npo: (2/beta) softplus(-(beta/2) Delta) = -(2/beta) log sigmoid(beta Delta / 2): value (2/beta) log 2 and slope
    -1/2 at Delta = 0, slope -> 0 as Delta grows (saturation), -> -Delta/2 + const as beta -> 0 (gradient ascent).
    ga: -Delta/2, NPO's beta -> 0 limit (the same weight at Delta = 0, so the ablation changes only the saturation):
    unbounded gradient ascent on the denoising error.
    """
    if kind == "npo":
        return (2.0 / beta) * F.softplus(-(beta / 2.0) * delta)
    if kind == "ga":
        return -delta / 2
    raise ValueError(f"unknown forget loss {kind!r}")


def denoise_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """l = mean_{C,H,W} ||target - pred||^2 per sample: (B, C, H, W) -> (B,), in fp32."""
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))


def kl_weights(scheduler, kind: str) -> torch.Tensor:
    """w(t) for t = 0..T-1, mean 1. The reverse kernels N(mu, s_t^2 I) of two models differ in mean by
    k_t (eps_1 - eps_2), k_t = beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)), so KL = k_t^2 ||eps_1 - eps_2||^2 / (2 s_t^2);
    with s_t^2 = beta_t (DDPM's fixed variance, finite at t = 0) the weight is beta_t / (alpha_t (1 - abar_t))."""
    betas, abar = scheduler.betas.double(), scheduler.alphas_cumprod.double()
    if kind == "uniform":
        return torch.ones(len(betas))
    if kind == "true":
        w = betas / ((1 - betas) * (1 - abar))
        return (w / w.mean()).float()
    raise ValueError(f"unknown KL weighting {kind!r}")


def kl_term(pred: torch.Tensor, pred_ref: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """L_KL = mean_b w(t_b) mean_{C,H,W} ||eps_theta - eps_ref||^2 (the reference is a constant)."""
    return (weights.to(pred.device)[t] * denoise_error(pred, pred_ref.detach())).mean()


def schedule(steps: int, forget_per_cycle: int, repair_per_cycle: int) -> list[str]:
    """The update plan: cycles of `forget_per_cycle` "forget" then `repair_per_cycle` "repair" until `steps` forget
    steps are planned; a last, shorter forget block is still followed by its repair block."""
    plan = []
    while plan.count("forget") < steps:
        k = min(forget_per_cycle, steps - plan.count("forget"))
        plan += ["forget"] * k + ["repair"] * repair_per_cycle
    return plan


def draw_timesteps(n_forget: int, n: int, weights: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """t for a batch whose first n_forget images are forget images and the rest retain images, and the per-t weights
    the KL term must then use. Forget images: t uniform in [forget_t_min, T). Retain images (--kl_t_sampling):
    weighted, t uniform and the weights w unchanged; importance, t drawn with probability w(t) / sum w and weight 1,
    since E_{t~U}[w(t) d(t)] = E_{t~w/sum w}[d(t)] when mean w = 1: the same KL with less variance (with the true
    weighting w(0) = 77, so one retain image at t = 0 otherwise outweighs a whole batch drawn uniformly)."""
    T = len(weights)
    t = torch.randint(0, T, (n,))
    if n_forget and args.forget_t_min > 0:
        t[:n_forget] = torch.randint(args.forget_t_min, T, (n_forget,))
    if args.kl_t_sampling == "importance":
        if n > n_forget:
            t[n_forget:] = torch.multinomial(weights, n - n_forget, replacement=True)
        weights = torch.ones_like(weights)
    return t, weights


def pure_step(unet, ref, scheduler, phase: str, x_f, c_f, x_r, c_r, args, weights) -> tuple[torch.Tensor, dict]:
    """One update's loss. forget: L_F + lambda L_KL on [forget | retain] images in one UNet call per model;
    repair: L_KL + gamma l(theta; x_r, c_r) on retain images. x_*: clean latents (B, 4, h, w); c_*: text states."""
    use_retain = phase == "repair" or args.kl_weight > 0
    if phase == "forget":
        x0, cond = (torch.cat([x_f, x_r]), torch.cat([c_f, c_r])) if use_retain else (x_f, c_f)
    else:
        x0, cond = x_r, c_r
    # Same t and eps for the trained and the reference model (Diffusion-DPO); drawn on the CPU (device-independent).
    t, weights = draw_timesteps(len(x_f) if phase == "forget" else 0, len(x0), weights, args)
    t = t.to(x0.device)
    eps = torch.randn(x0.shape).to(x0.device)
    x_t = scheduler.add_noise(x0, eps, t)
    with common.autocast(x0.device, ref.dtype):  # the frozen reference is in the model's dtype
        pred = unet(x_t, t, cond.float()).sample  # (2B or B, 4, h, w)
        with torch.no_grad():
            pred_ref = ref(x_t.to(ref.dtype), t, cond.to(ref.dtype)).sample
    err, err_ref = denoise_error(pred, eps), denoise_error(pred_ref, eps)  # (2B or B,)
    stats = {}
    if phase == "forget":
        B = len(x_f)
        delta = err[:B] - err_ref[:B]  # > 0 once the model denoises the concept worse than the reference
        loss_f = forget_loss(delta, args.beta, args.forget_loss).mean()
        loss_kl = kl_term(pred[B:], pred_ref[B:], t[B:], weights) if use_retain else torch.zeros((), device=x0.device)
        loss = loss_f + args.kl_weight * loss_kl
        stats.update(
            loss_forget=loss_f,
            delta=delta.mean(),
            err_forget=err[:B].mean(),
            npo_weight=torch.sigmoid(-args.beta * delta / 2).mean(),
        )
    else:
        loss_kl = kl_term(pred, pred_ref, t, weights)
        loss = loss_kl + args.repair_denoise_weight * err.mean()
    stats.update(loss=loss, kl=loss_kl)
    return loss, {k: v.detach() for k, v in stats.items()}  # tensors: no device sync until they are logged


# PLUMBING: the cached forget/retain sets
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


def cached_sets(model, run: str, prompts: dict, args) -> dict:
    """Forget and retain latents, generated once and kept in the run folder (reused by --resume)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(run, "cached_sets.safetensors")
    key = repr(
        dict(
            forget=prompts["forget"],
            retain=prompts["retain"],
            n_f=args.num_forget_samples,
            n_r=args.num_retain_samples,
            seed=args.seed,
            steps=args.gen_steps,
            guidance=args.guidance,
            model=model.path,
        )
    )
    if os.path.exists(path):
        with open(path + ".json") as f:
            if f.read() == key:
                return {k: v.to(model.device) for k, v in load_file(path).items()}
    batch = 4 * args.batch_size
    x_f, i_f = make_cached_set(
        model,
        prompts["forget"],
        args.num_forget_samples,
        args.seed * 1_000_000,
        args.gen_steps,
        args.guidance,
        batch,
        "forget set",
    )
    x_r, i_r = make_cached_set(
        model,
        prompts["retain"],
        args.num_retain_samples,
        args.seed * 1_000_000 + 500_000,
        args.gen_steps,
        args.guidance,
        batch,
        "retain set",
    )
    sets = dict(x_f=x_f, i_f=i_f, x_r=x_r, i_r=i_r)
    common.atomic_write(path + ".json", lambda f: f.write(key))
    save_file({k: v.cpu().contiguous() for k, v in sets.items()}, path)
    return {k: v.to(model.device) for k, v in sets.items()}


def main(args):
    # PLUMBING: prompts, model, run folder
    prompts = common.concept_prompts(args.concept, args.retain_prompts)  # fails early on an unknown concept
    common.seed_everything(args.seed)
    if args.model == "tiny":
        print(
            f"pure: using the embedded tiny model (data/tiny-sd); for Stable Diffusion pass --model {common.SD_IDS[0]}"
        )
    model = common.load_model(args.model, args.device, args.dtype)
    fill_world_defaults(args, model.world)
    run = common.init_run(
        args, "pure", model, extra=dict(forget_prompts=prompts["forget"], retain_prompts=prompts["retain"])
    )
    t_start = time.perf_counter()
    sets = cached_sets(model, run, prompts, args)
    t_sets = time.perf_counter() - t_start
    states_f = common.encode_prompts(model, prompts["forget"])  # (P_f, L, D), indexed per image below
    states_r = common.encode_prompts(model, prompts["retain"])
    unet = common.trainable_unet(model, args.gradient_checkpointing)
    params = common.select_params(unet, args.train_params)
    opt = torch.optim.Adam(params, lr=args.lr)
    plan = schedule(args.steps, args.forget_steps_per_cycle, args.repair_steps_per_cycle)
    weights = kl_weights(model.scheduler, args.kl_weighting)
    start = 0
    if args.resume:
        ckpt = common.load_checkpoint(run, {"unet": unet}, {"opt": opt})
        start = ckpt["step"]
        if plan[:start].count("forget") != ckpt["extra"]["forget_done"]:
            raise common.UsageError(
                f"--resume: the schedule of these flags differs from the run's before update "
                f"{start}; keep --forget_steps_per_cycle/--repair_steps_per_cycle and extend "
                f"--steps by whole cycles"
            )
    n_f, n_r, B = len(sets["x_f"]), len(sets["x_r"]), args.batch_size
    print(
        f"pure: {model.path} ({model.world}) on {model.device} {model.dtype}; concept {prompts['concept']!r}; "
        f"{sum(p.numel() for p in params) / 1e6:.2f}M trained parameters ({args.train_params}); {args.steps} forget "
        f"steps in {len(plan)} updates (cycles {args.forget_steps_per_cycle}+{args.repair_steps_per_cycle}); "
        f"batch {B}+{B}; loss {args.forget_loss} beta {args.beta} kl_weight {args.kl_weight}; {n_f} forget / "
        f"{n_r} retain cached images; run {run}" + (f"; resuming at update {start}" if start else "")
    )

    def save(update: int) -> None:
        common.save_unet(unet, os.path.join(run, "unet"))
        common.save_checkpoint(
            run, update, {"unet": unet}, {"opt": opt}, extra=dict(forget_done=plan[:update].count("forget"))
        )

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

    # The UNet passes an update needs (one forward+backward of the trained UNet and one forward of the reference, on 2B
    # images for a forget update with the trust region, on B otherwise), timed between updates: the denominator of
    # the step efficiency in summary.json.
    b_forget = 2 * B if args.kl_weight > 0 else B
    clock = common.UNetPassClock(
        model,
        {
            "forget": [(unet, b_forget, True), (model.unet, b_forget, False)],
            "repair": [(unet, B, True), (model.unet, B, False)],
        },
        len(plan) - start,
    )

    # ALGO LOGIC: alternating forget / repair updates
    step_time, window, train_time = 0.0, 0, 0.0
    for update in tqdm(range(start, len(plan)), desc="pure", initial=start, total=len(plan)):
        t0 = time.perf_counter()
        phase = plan[update]
        j_f, j_r = torch.randint(n_f, (B,)), torch.randint(n_r, (B,))  # batches of the cached sets
        x_f, c_f = sets["x_f"][j_f], states_f[sets["i_f"][j_f]]
        x_r, c_r = sets["x_r"][j_r], states_r[sets["i_r"][j_r]]
        for group in opt.param_groups:  # linear warm-up, from the update index alone (--resume needs no state)
            group["lr"] = args.lr * min(1.0, (update + 1) / args.lr_warmup) if args.lr_warmup else args.lr
        loss, stats = pure_step(unet, model.unet, model.scheduler, phase, x_f, c_f, x_r, c_r, args, weights)
        common.check_finite(loss, update + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0  # the finiteness check above synchronised the device
        step_time, window, train_time = step_time + dt, window + 1, train_time + dt
        clock.tick(update - start)

        # PLUMBING: logging, samples, checkpoints
        done = update + 1
        if done % args.log_every == 0 or done == len(plan):
            values = dict(
                phase=phase,
                forget_step=plan[:done].count("forget"),
                lr=opt.param_groups[0]["lr"],
                **{k: v.item() for k, v in stats.items()},
                sec_per_step=step_time / window,
            )
            step_time, window = 0.0, 0
            common.log_metrics(run, done, values)
            tqdm.write(
                f"pure step {done}/{len(plan)} "
                + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            )
        if args.sample_every and done % args.sample_every == 0 and done < len(plan):
            samples()
        if args.save_every and done % args.save_every == 0 and done < len(plan):
            save(done)
    save(len(plan))
    samples()

    # PLUMBING: timing summary. Efficiency = time per update / time of the UNet passes that update needs.
    n_forget, n_repair = plan[start:].count("forget"), plan[start:].count("repair")
    unet_time = n_forget * clock.seconds("forget") + (n_repair * clock.seconds("repair") if n_repair else 0.0)
    summary = dict(
        wall_seconds=time.perf_counter() - t_start,
        cached_sets_seconds=t_sets,
        train_seconds=train_time,
        updates=len(plan) - start,
        sec_per_update=train_time / max(1, len(plan) - start),
        unet_pass_seconds=unet_time,
        step_efficiency=train_time / unet_time if unet_time > 0 else None,
        peak_memory_mb=common.peak_memory_mb(model.device),
    )
    common.save_json(os.path.join(run, "summary.json"), summary)
    print(
        f"pure: done in {summary['wall_seconds']:.0f} s ({t_sets:.0f} s cached sets, {train_time:.0f} s for "
        f"{summary['updates']} updates; time per update / its UNet passes = "
        f"{common.fmt(summary['step_efficiency'])}); peak "
        f"memory {summary['peak_memory_mb']:.0f} MB; trained UNet in {os.path.join(run, 'unet')}, samples in "
        f"{os.path.join(run, 'samples.png')}"
    )
    return run


if __name__ == "__main__":
    common.cli(main, parse_args())
