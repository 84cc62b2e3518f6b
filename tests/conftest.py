"""Shared test setup: offline (HF_HUB_OFFLINE=1), CPU, the repository and data/ importable, the tiny-sd fixtures and
the tiny judge (judge_accuracies) of the efficacy tests."""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "data")):
    if p not in sys.path:
        sys.path.insert(0, p)

import pytest  # noqa: E402

# The embedded tiny Stable Diffusion folder; TEST_TINY_SD points the tests at another build (e.g. a smoke build).
TINY_SD = os.environ.get("TEST_TINY_SD", os.path.join(ROOT, "data", "tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd() -> str:
    return TINY_SD


@pytest.fixture(scope="session")
def tiny_model(tiny_sd):
    import common

    return common.load_model(tiny_sd, device="cpu")


def judge_accuracies(model, unets: list, classes: list[str], n: int, t_init: int | None = None) -> list[dict]:
    """Per UNet, the tiny judge's (data/tiny-classifier) top-1 accuracy on n images per class: prompt "an image of a
    {class}", the evaluation seeds of data/prompts/imagenette.csv, 25 DDIM steps, guidance 7.5 (one step with
    `t_init`). A quick check of forgetting for the efficacy tests; eval.py gives the full metrics."""
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    import common

    judge = AutoModelForImageClassification.from_pretrained(os.path.join(ROOT, "data", "tiny-classifier")).eval()
    processor = AutoImageProcessor.from_pretrained(os.path.join(ROOT, "data", "tiny-classifier"), use_fast=False)
    rows = {r["class"]: r for r in common.read_prompts(os.path.join(common.PROMPTS_DIR, "imagenette.csv"))}
    cond = common.encode_prompts(model, [rows[c]["prompt"] for c in classes for _ in range(n)])
    z_T = common.initial_latents(model, [rows[c]["evaluation_seed"] + k for c in classes for k in range(n)])
    labels = torch.tensor([judge.config.label2id[c] for c in classes for _ in range(n)])
    out = []
    for unet in unets:
        with torch.no_grad(), common.autocast(model.device, model.dtype):
            x0 = common.sample(model, cond, z_T, steps=25, guidance=7.5, unet=unet, t_init=t_init)
            pred = judge(**processor(images=list(common.decode(model, x0)), return_tensors="pt")).logits.argmax(-1)
        ok = (pred == labels).float().reshape(len(classes), n).mean(1)
        out.append(dict(zip(classes, ok.tolist())))
    return out
