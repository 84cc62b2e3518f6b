"""What does rl_critic.py's forget trust region pull a forget prompt toward? The policy's kernel on a forget prompt
is kept near a target kernel of the frozen reference (--forget_kl_weight); this samples the reference with that
target alone and counts what the judge sees:

    empty      eps(x, ""): the reference with no prompt (--forget_anchor empty)
    esd ETA    eps(x, "") - ETA (eps(x, c_f) - eps(x, "")): ESD's negatively guided target (--forget_anchor esd
               --negative_guidance ETA)

    python benchmark/anchor_rates.py --concept church "garbage truck" parachute --negative_guidance 1 2

Sampled as the rollouts are (rl_critic.py's tiny defaults: 10 DDIM steps, eta 1), from the initial noises of seeds
7000..7000+n-1, c_f = "an image of a {class}". Per concept and target: the judge's (data/tiny-classifier) rate of
concept top-1 and its whole class distribution. A target that still draws the concept lets a policy that stays
close to it draw the concept too (README, rl_critic.py). Tiny world only.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
import rl_critic  # noqa: E402


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concept", nargs="+", default=["church"], help="Imagenette classes (forget concepts)")
    p.add_argument("--negative_guidance", nargs="*", type=float, default=[1.0], help="ESD's eta values to sample")
    p.add_argument("--n", type=int, default=200, help="images per concept and target")
    p.add_argument("--seed", type=int, default=7000, help="first initial-noise seed (not eval.py's seeds)")
    p.add_argument("--output", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1 (got {args.n})")
    for eta in args.negative_guidance:
        if not eta > 0:
            p.error(f"--negative_guidance values must be > 0 (got {eta:g})")
    return args


def main(args):
    concepts = []
    for c in args.concept:
        found = common.imagenette_class(c)
        if found is None:
            raise common.UsageError(f"concept {c!r} is not an Imagenette class: {', '.join(common.IMAGENETTE)}")
        concepts.append(found)
    defaults = rl_critic.parse_args([])
    rl_critic.fill_world_defaults(defaults, "tiny")
    steps, eta = defaults.sample_steps, defaults.eta
    model = common.load_model("tiny", "cpu", "fp32")
    judge = common.TinyJudge()
    z_T = common.initial_latents(model, list(range(args.seed, args.seed + args.n)))

    def judged(prompt: str, guidance: float) -> list[str]:
        cond = common.encode_prompts(model, [prompt] * args.n)
        gen = torch.Generator().manual_seed(0)  # the eta > 0 noise
        with torch.no_grad():
            images = common.decode(model, common.sample(model, cond, z_T, steps, guidance, eta, generator=gen))
            pred = judge(images).argmax(-1)
        return [judge.config.id2label[int(k)] for k in pred]

    # eps(x, "") needs no guidance (cond = uncond); cfg_eps with scale -ETA on c_f is ESD's target
    empty = judged("", 1.0)
    table = []
    for concept in concepts:
        targets = [("empty", empty)]
        targets += [(f"esd {g:g}", judged(f"an image of a {concept}", -g)) for g in args.negative_guidance]
        for name, labels in targets:
            dist = {c: labels.count(c) / args.n for c in common.IMAGENETTE}
            table.append(dict(concept=concept, target=name, concept_rate=dist[concept], classes=dist))
    print(f"judge's classes on {args.n} images per target ({steps} DDIM steps, eta {eta:g}, seeds {args.seed}+)")
    print("concept | target | concept rate | most frequent classes")
    for e in table:
        top = ", ".join(f"{c} {v:.2f}" for c, v in sorted(e["classes"].items(), key=lambda kv: -kv[1])[:4])
        print(f"{e['concept']} | {e['target']} | {e['concept_rate']:.3f} | {top}")
    if args.output:
        out = dict(n=args.n, steps=steps, eta=eta, seed=args.seed, table=table)
        common.atomic_write(args.output, lambda f: json.dump(out, f, indent=2))
    return table


if __name__ == "__main__":
    common.cli(main, parse_args())
