"""Does the RL critic's reward model see the concept where the evaluation judge does? For a run of rl_critic.py (or
the base model), sample the forget class's evaluation images three ways and count how often each model takes them for
the concept:

    eval     25 DDIM steps, eta 0: eval.py's images (same prompt, seeds and guidance)
    ddim     the run's rollout steps (tiny 10), eta 0
    rollout  the run's rollout steps and eta (tiny 10, eta 1): what the policy was trained on

    python benchmark/reward_vs_judge.py runs/table/rl_critic/rl_critic__garbage_truck__s0
    python benchmark/reward_vs_judge.py tiny --concept church --reward_cnn small strong

Per sampler: the judge's (data/tiny-classifier) rate of concept top-1, and each reward CNN's rate and mean
p(concept). If the judge's rate is the same under the three samplers, a train/eval sampler mismatch is not why the
judge sees more of the concept than the reward did; if the reward CNN's rate is far below the judge's, the policy
has found images that fool the reward (README, rl_critic.py). Tiny world only (the reward CNNs are its own). The
first use of a reward CNN fits and caches it (rl_critic.fit_classifier: 6 or 14 CPU-minutes).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import common  # noqa: E402
import rl_critic  # noqa: E402

SAMPLERS = ["eval", "ddim", "rollout"]


def parse_args(argv=None):
    p = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="an rl_critic.py run folder (its unet/ and args.json), or 'tiny' for the base model")
    p.add_argument("--concept", default=None, help="the forget class (default: the run's; required with 'tiny')")
    p.add_argument("--n", type=int, default=50, help="images per sampler: evaluation seeds 0..n-1 of the class's row")
    p.add_argument(
        "--reward_cnn",
        nargs="+",
        default=["small", "strong"],
        choices=list(rl_critic.REWARD_CNNS),
        help="which reward CNNs to ask (rl_critic.py --reward_cnn)",
    )
    p.add_argument("--output", default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n must be >= 1 (got {args.n})")
    return args


def run_settings(run: str, concept: str | None) -> dict:
    """Concept, rollout steps, eta and guidance of a run folder (args.json), or of rl_critic.py's tiny defaults."""
    if run == "tiny":
        if concept is None:
            raise common.UsageError("the base model 'tiny' needs --concept (an Imagenette class)")
        defaults = rl_critic.parse_args([])
        rl_critic.fill_world_defaults(defaults, "tiny")
        found = dict(concept=concept, sample_steps=defaults.sample_steps, eta=defaults.eta, guidance=defaults.guidance)
        return dict(found, unet=None)
    path = os.path.join(run, "args.json")
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(run, "unet")):
        raise common.UsageError(f"{run!r} is not a finished rl_critic.py run folder (needs args.json and unet/)")
    with open(path) as f:
        record = json.load(f)
    a = record.get("args", {})
    if record.get("method") != "rl_critic":
        raise common.UsageError(f"{run!r} is a {record.get('method')!r} run, not an rl_critic.py run")
    if a.get("model") != "tiny":
        raise common.UsageError(f"{run!r} is a {a['model']!r} run; this diagnostic is for the tiny world only")
    out = {k: a[k] for k in ["concept", "sample_steps", "eta", "guidance"]}
    if concept is not None and concept != out["concept"]:
        raise common.UsageError(f"--concept {concept!r} differs from the run's concept {out['concept']!r}")
    return dict(out, unet=os.path.join(run, "unet"))


def main(args):
    s = run_settings(args.run, args.concept)
    concept = common.imagenette_class(s["concept"])
    if concept is None:
        raise common.UsageError(f"concept {s['concept']!r} is not an Imagenette class: {', '.join(common.IMAGENETTE)}")
    model = common.load_model("tiny", "cpu", "fp32", unet_path=s["unet"])
    judge = common.TinyJudge()
    cnns = {name: rl_critic.fit_classifier(model, **rl_critic.REWARD_CNNS[name]) for name in args.reward_cnn}
    row = {r["class"]: r for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))}[concept]
    cond = common.encode_prompts(model, [row["prompt"]] * args.n)
    z_T = common.initial_latents(model, [row["evaluation_seed"] + k for k in range(args.n)])
    settings = {"eval": (25, 0.0), "ddim": (s["sample_steps"], 0.0), "rollout": (s["sample_steps"], s["eta"])}
    c_judge, c_cnn = judge.config.label2id[concept], common.IMAGENETTE.index(concept)
    table = []
    for name in SAMPLERS:
        steps, eta = settings[name]
        gen = torch.Generator().manual_seed(0)  # the eta > 0 noise
        with torch.no_grad():
            images = common.decode(model, common.sample(model, cond, z_T, steps, s["guidance"], eta, generator=gen))
            pj = judge(images).softmax(-1)
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            entry = dict(
                sampler=name, steps=steps, eta=eta, judge_rate=(pj.argmax(-1) == c_judge).float().mean().item()
            )
            for cnn_name, net in cnns.items():
                pr = net(x).softmax(-1)
                entry[f"{cnn_name}_rate"] = (pr.argmax(-1) == c_cnn).float().mean().item()
                entry[f"{cnn_name}_p"] = pr[:, c_cnn].mean().item()
        table.append(entry)
    print(f"{args.run}: {concept!r}, {args.n} images per sampler (evaluation seeds), guidance {s['guidance']}")
    head = ["sampler", "judge: concept"] + [f"{c} CNN: concept (mean p)" for c in cnns]
    print(" | ".join(head))
    for e in table:
        cells = [f"{e['sampler']} ({e['steps']} steps, eta {e['eta']:g})", f"{e['judge_rate']:.2f}"]
        cells += [f"{e[c + '_rate']:.2f} ({e[c + '_p']:.3f})" for c in cnns]
        print(" | ".join(cells))
    if args.output:
        out = dict(run=args.run, concept=concept, n=args.n, guidance=s["guidance"], table=table)
        common.atomic_write(args.output, lambda f: json.dump(out, f, indent=2))
    return table


if __name__ == "__main__":
    common.cli(main, parse_args())
