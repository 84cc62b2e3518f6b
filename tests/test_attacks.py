"""attacks.py through eval.py: the soft prompt sits after BOS and only it gets gradients; the attack finds the concept
in a model that still draws it (the base model, SFD's distilled one-step generator) and not in a random UNet; on an
unlearned run it finds more than the clean prompt does and relearning brings the concept back; bad input.

Every efficacy test scores the church row only (data/prompts/imagenette.csv), 20 images, with the default budget."""

import json
import os
import re

import pytest
import torch
from test_eval import make_run, write_rows

import attacks
import common
import eval as ev
from common import UsageError

N = "20"  # images of the forget class per check (eval.py's evaluation seeds of the church row)


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch, tmp_path):
    monkeypatch.setattr(ev, "TINY_CLASSIFIER", os.environ.get("TEST_TINY_CLASSIFIER", ev.TINY_CLASSIFIER))
    monkeypatch.setattr(ev, "REFERENCE_CACHE", str(tmp_path / "reference"))
    monkeypatch.chdir(tmp_path)  # a base model PATH writes runs/base__{name}/ here


@pytest.fixture(scope="module")
def church_csv(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompts")
    rows = common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))
    write_rows(folder, [r for r in rows if r["class"] == "church"])
    return str(folder / "prompts.csv")


def run_eval(path, church_csv, *flags) -> dict:
    argv = [str(path), "--metrics", "ua", "--n_per_class", N, "--prompts", church_csv, "--device", "cpu", *flags]
    args = ev.parse_args([str(a) for a in argv])
    ev.main(args)
    folder = path if os.path.isfile(os.path.join(path, "args.json")) else ev.plan(str(path), args, None)["path"]
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- the soft prompt


def test_soft_prompt_goes_after_bos_and_only_it_gets_gradients(tiny_model):
    """Three soft tokens equal to the embeddings of "an image of", before "a church", give exactly the text states of
    "an image of a church"; the loss's gradient reaches the soft tokens and no weight of the frozen models."""
    tok, table = tiny_model.tokenizer, tiny_model.text_encoder.get_input_embeddings().weight
    ids = tok(["an image of"]).input_ids[0][1:-1]  # without BOS and EOS
    adv = table[ids].detach().clone().requires_grad_(True)  # (3, D)
    states = attacks.soft_prompt_states(tiny_model, ["a church", "a tench"], adv)
    expected = common.encode_prompts(tiny_model, ["an image of a church", "an image of a tench"])
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-5)
    other = adv.detach() + torch.randn(adv.shape, generator=torch.Generator().manual_seed(0))  # (+1 would not do: the
    other = attacks.soft_prompt_states(tiny_model, ["a church"], other)  # layer norms remove a constant shift)
    assert not torch.allclose(other[0, 1:], expected[0, 1:], atol=1e-2)  # the soft tokens change all but BOS's
    assert torch.equal(other[0, 0], states[0, 0])  # causal: BOS's state is the same
    x0 = torch.randn(2, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(0))
    loss = attacks.denoising_loss(tiny_model, tiny_model.unet, x0, states, torch.Generator().manual_seed(0))
    loss.backward()
    assert adv.grad is not None and adv.grad.abs().sum() > 0
    frozen = [*tiny_model.unet.parameters(), *tiny_model.text_encoder.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in frozen)
    assert torch.isfinite(loss) and loss.ndim == 0


def test_denoising_loss_is_the_epsilon_mse_at_the_drawn_t(tiny_model):
    """The objective, recomputed by hand from the same draws: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    x0 = torch.randn(3, *tiny_model.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = common.encode_prompts(tiny_model, ["an image of a church"] * 3)
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(0, 1000, (3,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    abar = tiny_model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = tiny_model.unet(abar.sqrt() * x0 + (1 - abar).sqrt() * eps, t, cond).sample
        loss = attacks.denoising_loss(tiny_model, tiny_model.unet, x0, cond, torch.Generator().manual_seed(5))
        at_init = attacks.denoising_loss(tiny_model, tiny_model.unet, x0, cond, torch.Generator().manual_seed(5), 625)
    assert loss.item() == pytest.approx(((pred - eps) ** 2).mean().item(), rel=1e-5)
    assert at_init.item() != pytest.approx(loss.item(), rel=1e-3)  # a one-step generator is fitted at t_init


def test_simplex_projection_is_the_nearest_distribution():
    """Rows already on the simplex stay; any row goes to a distribution no random distribution is nearer to."""
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(4, 7, generator=gen)
    p = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(attacks.project_simplex(p), p)
    w = torch.randn(4, 7, generator=gen) * 3
    q = attacks.project_simplex(w)
    assert (q >= 0).all() and torch.allclose(q.sum(-1), torch.ones(4)) and (q == 0).any()
    others = torch.rand(1000, 1, 7, generator=gen) ** 4
    others = others / others.sum(-1, keepdim=True)  # (1000, 1, 7) random points of the simplex
    assert ((others - w).norm(dim=-1) >= (q - w).norm(dim=-1) - 1e-6).all()


def test_the_attack_fits_a_distribution_over_the_vocabulary(tiny_model):
    """From uniform, the steps move w; the soft prompt is w @ E, a point in the hull of the token embeddings."""
    x0 = attacks.target_latents(tiny_model, ["an image of a church"], 2, seed=0)
    adv, ids, losses = attacks.soft_prompt_attack(tiny_model, ["an image of a church"], x0, steps=20, tokens=3)
    table = tiny_model.text_encoder.get_input_embeddings().weight
    assert ids.shape == (3,) and adv.shape == (3, table.shape[1]) and len(losses) == 20
    assert ids.tolist() != [0, 0, 0]  # the argmax of the uniform start: w has moved
    assert not torch.allclose(adv[0], table.float().mean(0), atol=1e-3)  # nor is w @ E the start, the mean embedding
    norms = table.float().norm(dim=-1)
    assert (adv.norm(dim=-1) <= norms.max() + 1e-4).all()  # inside the hull: no longer than the longest token
    again = attacks.soft_prompt_attack(tiny_model, ["an image of a church"], x0, steps=20, tokens=3)
    assert torch.equal(again[0], adv) and again[2] == losses  # seeded: the same draws, the same soft prompt


def test_attack_and_relearning_run_in_bf16_as_on_a_gpu(tiny_sd):
    """--dtype bf16's regime (eval.py's default on CUDA): frozen models bf16 under autocast, the soft prompt and the
    relearned UNet fp32 (loaded again from disk), losses fp32."""
    model = common.load_model(tiny_sd, device="cpu", dtype="bf16")
    x0 = attacks.target_latents(model, ["an image of a church"], 2, seed=0)
    adv, ids, losses = attacks.soft_prompt_attack(model, ["an image of a church"], x0, steps=3, tokens=2)
    assert adv.dtype == torch.float32 and adv.shape == (2, model.text_encoder.config.hidden_size) and len(ids) == 2
    assert model.unet.dtype == torch.bfloat16 and all(torch.isfinite(torch.tensor(losses)))
    seen = {}
    scores, losses = attacks.relearn(
        model, ["an image of a church"], x0, [1, 2], 1e-4, score=lambda s, u: seen.setdefault(s, u.dtype)
    )
    assert seen == scores == {1: torch.float32, 2: torch.float32} and len(losses) == 2


# ---------------------------------------------------------------- efficacy, through eval.py


def test_attack_finds_church_in_the_base_model_and_nothing_in_a_random_unet(tiny_sd, church_csv, tmp_path):
    from diffusers import UNet2DConditionModel

    base = run_eval(tiny_sd, church_csv, "--forget_class", "church", "--attack", "soft_prompt")
    attack = base["attack"]
    print("base model", attack["ASR"], attack["UA_clean"])
    assert attack["ASR_attack_only"] >= 0.6 and base["summary"]["ASR"] == attack["ASR"]  # the base still draws church
    assert attack["ASR"] >= max(attack["ASR_attack_only"], 1 - attack["UA_clean"])  # either image of a seed counts
    assert attack["UA_clean"] == base["summary"]["UA"] <= 0.2 and attack["n_images"] == int(N)
    assert attack["budget"]["steps"] == 300 and attack["budget"]["tokens"] == 5 and attack["seconds"]["optimise"] > 0
    assert attack["loss"]["mean_last_10"] < attack["loss"]["first"]  # the objective went down
    folder = attack["images"]
    assert len([f for f in os.listdir(folder) if f.endswith(".png")]) == int(N)
    assert f"<soft: {attack['tokens']}> an image of a church" in open(os.path.join(folder, "prompts.csv")).read()
    assert len(attack["token_ids"]) == 5
    run = tmp_path / "random"
    make_run(run, unet=False, base_model=tiny_sd)
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_sd, subfolder="unet")).save_pretrained(
        run / "unet"
    )
    random = run_eval(run, church_csv, "--attack", "soft_prompt")["attack"]
    print("random UNet", random["ASR"], random["UA_clean"])
    # A random UNet draws coloured noise, and the tiny judge, a closed 10-way classifier with no "nothing" class,
    # takes about half of it for church (0.45 of the clean images, confidently): the attack must find no more
    # church than that, where on the base model it finds church in most images.
    assert random["ASR_attack_only"] <= (1 - random["UA_clean"]) + 0.15


def test_attack_and_relearn_on_a_one_step_generator(tiny_sd, church_csv, tmp_path):
    """SFD's format (args.json's sampler.t_init) with the distilled generator, which has forgotten nothing."""
    import sfd

    run = tmp_path / "sfd"
    make_run(run, unet=False, base_model=tiny_sd)
    info = json.load(open(run / "args.json"))
    common.save_json(str(run / "args.json"), dict(info, method="sfd", sampler=dict(t_init=625)))
    sfd.load_generator(common.load_model(tiny_sd, device="cpu"), sfd.TINY_GENERATOR).save_pretrained(run / "unet")
    m = run_eval(run, church_csv, "--attack", "soft_prompt", "--relearn", "5", "2")
    print("one-step generator", m["attack"]["ASR"], m["attack"]["UA_clean"], m["relearn"]["UA"])
    assert m["generation"]["sampler"] == "one step at t_init=625" and "t_init 625" in m["attack"]["definition"]
    assert m["attack"]["ASR"] >= 0.6 and m["summary"]["UA"] <= 0.3
    assert m["relearn"]["steps"] == [2, 5] and max(m["relearn"]["UA"]) <= 0.3
    assert m["summary"]["UA_relearn_5"] == m["relearn"]["UA"][1]
    for step in (2, 5):
        assert len([f for f in os.listdir(run / "relearn" / str(step)) if f.endswith(".png")]) == int(N)


# ---------------------------------------------------------------- bad input


def test_bad_budgets_exit_2_with_one_line(capsys):
    for argv, message in (
        (["x", "--attack", "soft_prompt", "--attack_steps", "0"], "--attack_steps must be >= 1, got 0"),
        (["x", "--attack", "soft_prompt", "--attack_tokens", "0"], "--attack_tokens must be >= 1, got 0"),
        (["x", "--relearn", "0"], "--relearn must be >= 1, got 0"),
        (["x", "--relearn", "5", "-2"], "--relearn must be >= 1, got -2"),
        (["x", "--relearn", "3", "--target_images", "0"], "--target_images must be >= 1, got 0"),
        (["x", "--attack", "soft_prompt", "--attack_lr", "0"], "--attack_lr must be > 0, got 0.0"),
        (["x", "--attack", "text_grad"], "invalid choice: 'text_grad'"),
    ):
        with pytest.raises(SystemExit) as e:
            ev.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_too_many_soft_tokens_name_what_fits(tiny_model):
    adv = torch.zeros(20, tiny_model.text_encoder.config.hidden_size)
    with pytest.raises(UsageError, match=re.escape("--attack_tokens 20: the prompt has 7 tokens")):
        attacks.soft_prompt_states(tiny_model, ["an image of a church"], adv)


CANNOT = {  # case -> what the message must say
    "base model, no class": "is a base model, with no concept; name the class with --forget_class",
    "image folder": "is an image folder, with no UNet to attack",
    "sfd without sampler": "args.json is an SFD run without its 'sampler'",
    "no row of the class": "--forget_class 'tench': ",
    "too many soft tokens": "--attack_tokens 10: the prompt has 7 tokens with BOS and EOS, the text encoder takes 16",
}


@pytest.mark.parametrize("case", list(CANNOT))
def test_what_cannot_be_attacked_is_one_usage_error(case, tiny_sd, church_csv, tmp_path):
    import pictonette

    path, message = str(tmp_path / "x"), CANNOT[case]
    flags = ["--attack", "soft_prompt"] if case != "sfd without sampler" else ["--relearn", "5"]
    if case == "base model, no class":
        path = tiny_sd
    elif case == "no row of the class":  # the prompt file has only the church row
        path, flags = tiny_sd, flags + ["--forget_class", "tench"]
    elif case == "too many soft tokens":
        path, flags = tiny_sd, flags + ["--forget_class", "church", "--attack_tokens", "10"]
    elif case == "image folder":
        pictonette.write_folder(path, 2, 3000, ["church"])
    else:
        os.makedirs(path)
        make_run(path, base_model=tiny_sd)
        info = json.load(open(os.path.join(path, "args.json")))
        common.save_json(os.path.join(path, "args.json"), dict(info, method="sfd"))
    args = ev.parse_args([path, "--device", "cpu", "--prompts", church_csv, *flags])
    with pytest.raises(UsageError, match=re.escape(message)):
        ev.main(args)
    assert not os.path.exists(os.path.join(path, "attack")) and not os.path.exists(os.path.join(path, "images"))
