"""Build the tiny world from scratch: tiny-sd, tiny-clip and tiny-classifier, trained on Pictonette.

    python data/build_tiny.py                 # full build into data/ (about two hours on 2 CPU cores)
    python data/build_tiny.py --smoke         # every stage for a few iterations, into a temporary folder
    python data/build_tiny.py --stages report # only re-measure the quality figures of the built models

Stages, in order (each one saves its result before the next starts; `--stages` reruns a subset):
  tokenizer   CLIPTokenizer with a BPE vocabulary learnt from the captions' words (every word one token)
  vae         AutoencoderKL 32x32x3 -> 4x8x8, reconstruction + small KL; sets scaling_factor = 1/std(latents)
  classifier  ResNet judge (transformers) over the 10 classes, trained with blur, noise and VAE reconstructions
              so that it judges the concept, not the generator's softness
  clip        CLIPModel (text + vision) trained contrastively; its text tower initialises tiny-sd's text encoder
  unet        UNet2DConditionModel and the text encoder trained together (the text encoder at a lower learning rate),
              SD v1.4's noise schedule, min-SNR-5 loss weights, 10% empty prompts, EMA weights; saved with the rest
              as a StableDiffusionPipeline folder. Every 1000 steps it prints how often the judge recognises the
              class in images it samples. (Trained on contrastive text states alone, the UNet could not tell several
              classes apart: the `clip` stage's targets count "church" and "a photo of a church" as negatives,
              which leaves different classes' states nearly parallel.)
  clip_vision CLIP's text tower replaced by tiny-sd's text encoder (frozen, so the two stay byte-identical) and the
              vision tower trained against it, with positives = every (image, caption) pair whose image shows what
              the caption states
  report      the quality figures: judge accuracy, per-class accuracy of generated images, style/background
              rates, UNet speed, sample grids (data/tiny-sd/samples.png, sketch_samples.png), written to
              <out>/build_report.json

The vae and unet stages save their progress to `<out>/.checkpoints/` every 250 steps; after a crash or a stop, the
same command continues from there to the same weights as an uninterrupted build.

Everything is seeded (`--seed`); data come from `pictonette.make` with training seeds below 1000, held-out
evaluation images from seeds >= 1000.
"""

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pictonette  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ["tokenizer", "vae", "classifier", "clip", "unet", "clip_vision", "report"]
MAX_TOKENS = 16  # longest caption is 13 tokens with the start/end tokens
CHECKPOINT_EVERY = 250  # steps between two StageCheckpoint saves of the vae and unet stages


# ---------------------------------------------------------------- helpers


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def data_pool(n: int, seed: int) -> dict:
    """A training pool, generated once (about 1 ms per image)."""
    return pictonette.make(n, seed=seed)


def blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur (sigma (N,) in pixels; 0 = none), 5x5 separable kernel."""
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (N, 5)
    k = k / k.sum(1, keepdim=True)
    n, c, h, w = x.shape
    xp = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
    kc = k.repeat_interleave(c, 0)  # (N*C, 5)
    xp = F.conv2d(xp, kc[:, None, None, :], groups=n * c)
    xp = F.conv2d(xp, kc[:, None, :, None], groups=n * c)
    return xp.reshape(n, c, h, w)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def contrastive_loss(logits: torch.Tensor, match: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE: logits (N, N) image x text, match[i, j] = 1 for every positive pair."""
    i2t = torch.sum(-(match / match.sum(1, keepdim=True)) * F.log_softmax(logits, 1), 1).mean()
    t2i = torch.sum(-(match.T / match.T.sum(1, keepdim=True)) * F.log_softmax(logits.T, 1), 1).mean()
    return 0.5 * (i2t + t2i)


def train_step(opt, sched, loss: torch.Tensor, clip_params=None) -> None:
    """One optimiser step (with gradient-norm clipping at 1 when `clip_params` are given) and one schedule step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()
    sched.step()


class StageCheckpoint:
    """Crash-safe progress of a long training stage: `<out>/.checkpoints/<stage>.pt`, written atomically every
    `every` steps and deleted once the stage has saved its result. Rerunning the stage with the same settings
    continues from it (a stage of an hour or more can then run over several sessions); with other settings it starts
    afresh and says so."""

    def __init__(self, ckpt_dir: str, stage: str, settings: dict, every: int):
        self.path = os.path.join(ckpt_dir, f"{stage}.pt") if ckpt_dir else None
        self.stage, self.settings, self.every = stage, settings, every

    def load(self) -> dict | None:
        if self.path is None or not os.path.exists(self.path):
            return None
        state = torch.load(self.path, weights_only=True)
        if state["settings"] != self.settings:
            print(f"{self.stage}: ignoring {self.path}: it was made with {state['settings']}, not {self.settings}")
            return None
        print(f"{self.stage}: continuing from {self.path} at step {state['step']}")
        return state

    def maybe_save(self, step: int, total: int, **state) -> None:
        """Save after step `step` (0-based) when it completes a multiple of `every` (not after the last one)."""
        if self.path is None or (step + 1) % self.every or step + 1 >= total:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        torch.save(dict(state, step=step + 1, settings=self.settings), self.path + ".tmp")
        os.replace(self.path + ".tmp", self.path)

    def remove(self) -> None:
        if self.path is not None and os.path.exists(self.path):
            os.remove(self.path)


# ---------------------------------------------------------------- tokenizer


def learn_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges (CLIP's format, "</w>" marks a word's end) until every word is a single token."""
    corpus = {tuple(w[:-1]) + (w[-1] + "</w>",): 1 for w in words}
    merges = []
    while True:
        pairs = Counter()
        for symbols in corpus:
            for a, b in zip(symbols, symbols[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties broken alphabetically
        merges.append(best)
        new = {}
        for symbols in corpus:
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new[tuple(out)] = 1
        corpus = new


def build_tokenizer(out: str):
    from transformers import CLIPTokenizer

    words = pictonette.vocabulary()
    merges = learn_bpe(words)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = list(letters) + [c + "</w>" for c in letters]
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # last two ids, as in CLIP (eos has the largest id)
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer(
            os.path.join(tmp, "vocab.json"),
            os.path.join(tmp, "merges.txt"),
            model_max_length=MAX_TOKENS,
            pad_token="<|endoftext|>",
        )
        tok.save_pretrained(out)
    tok = CLIPTokenizer.from_pretrained(out)
    for w in words:  # every caption word must be exactly one token
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, ids)
    print(f"tokenizer: {len(vocab)} tokens, {len(words)} words, {len(merges)} merges")
    return tok


# ---------------------------------------------------------------- VAE


def build_vae(
    out: str,
    steps: int,
    seed: int,
    n_eval: int,
    batch: int = 64,
    ckpt_dir: str = None,
    resume: bool = False,
    lr: float = 1e-3,
    sketch_fraction: float = None,
    style_margin: float = 0.0,
):
    """Train the VAE (or, with `resume`, fine-tune the one saved in `out`) and save it with its scaling factor.

    `style_margin` > 0 adds a hinge loss on the latents' spatial means: along a learned unit direction, a sketch's
    mean must lie at least `style_margin` latent standard deviations on one side of a learned threshold and a filled
    icon's on the other, so that style is a global feature of the latents. Without it a sketch is encoded as a weaker
    copy of its filled icon. Tried for issue 2's sketch bar and not adopted: guidance still took the style away, and
    the class bar was lost (data/README.md, "Sketches"). `sketch_fraction` sets the share of sketches in the training
    pool (default: Pictonette's own mix)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=32,
        layers_per_block=1,
        norm_num_groups=32,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
    )
    if resume:  # --vae_resume: fine-tune the VAE already saved in `out`
        vae = AutoencoderKL.from_pretrained(out)
    print(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    if sketch_fraction is None:
        data = data_pool(max(batch * 4, min(steps * batch, 60000)), seed=1)
        pool = to_tensor(data["images"])
        is_sketch = torch.tensor([1.0 if s == "sketch" else -1.0 for s in data["styles"]])
    else:  # --vae_sketch_fraction: filled icons from seed 1, then sketches from seed 2
        n = min(steps * batch, 60000)
        n_sketch = round(n * sketch_fraction)
        pool = torch.cat(
            [
                to_tensor(pictonette.make(n - n_sketch, seed=1, style="filled")["images"]),
                to_tensor(pictonette.make(n_sketch, seed=2, style="sketch")["images"]),
            ]
        )
        is_sketch = torch.cat([-torch.ones(n - n_sketch), torch.ones(n_sketch)])
    probe = to_tensor(pictonette.make(200, seed=1006)["images"])
    # channels_last: the convolutions dominate and run about 1.3x faster in this layout on CPU
    vae = vae.to(memory_format=torch.channels_last)
    params = list(vae.parameters())
    if style_margin:  # the style direction (unit-normalised where used) and threshold of the hinge
        direction = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(seed)))
        threshold = torch.nn.Parameter(torch.zeros(()))
        params += [direction, threshold]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    gen = torch.Generator().manual_seed(seed)
    settings = dict(steps=steps, seed=seed, batch=batch)
    if resume or lr != 1e-3 or sketch_fraction is not None or style_margin:
        settings.update(resume=resume, lr=lr, sketch_fraction=sketch_fraction, style_margin=style_margin)
    ckpt = StageCheckpoint(ckpt_dir, "vae", settings, every=CHECKPOINT_EVERY)
    start = 0
    if state := ckpt.load():
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start = state["step"]
        if style_margin:
            direction.data.copy_(state["direction"])
            threshold.data.copy_(state["threshold"])
    for step in (bar := tqdm(range(start, steps), desc="vae", initial=start, total=steps)):
        idx = torch.randint(len(pool), (batch,), generator=gen)
        x = pool[idx].contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (4 * 8 * 8)
        if not style_margin:
            loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-4 * kl
        else:  # the same loss (written as benchmark/vae_lines.py writes it) plus the style hinge
            err = rec - x
            loss = (err**2).mean() + 0.5 * err.abs().mean() + 1e-4 * post.kl().mean() / (4 * 8 * 8)
            score = z.mean((2, 3)) @ (direction / direction.norm()) + threshold
            loss = loss + F.relu(style_margin * z.detach().std() - is_sketch[idx] * score).mean()
        train_step(opt, sched, loss, clip_params=vae.parameters())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", kl=f"{kl.item():.2f}")
        if step % 250 == 0 or step == steps - 1:
            with torch.no_grad():
                rec = vae.decode(vae.encode(probe).latent_dist.mode()).sample
            tqdm.write(f"vae: step {step} held-out reconstruction MSE {F.mse_loss(rec, probe).item():.4f}")
        extra = dict(direction=direction.detach(), threshold=threshold.detach()) if style_margin else {}
        ckpt.maybe_save(
            step,
            steps,
            vae=vae.state_dict(),
            opt=opt.state_dict(),
            sched=sched.state_dict(),
            gen=gen.get_state(),
            **extra,
        )
    vae = vae.to(memory_format=torch.contiguous_format).eval()
    with torch.no_grad():  # SD's scaling_factor convention: unit-variance latents
        held = to_tensor(pictonette.make(n_eval, seed=1001)["images"])
        post = vae.encode(held).latent_dist
        z = post.sample(generator=gen)
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        rec = vae.decode(post.mode()).sample
        mse = F.mse_loss(rec, held).item()
    vae.save_pretrained(out, safe_serialization=True)
    ckpt.remove()
    print(f"vae: held-out reconstruction MSE {mse:.4f} (on [-1, 1]), scaling_factor {vae.config.scaling_factor:.4f}")
    return dict(vae_mse=mse, vae_scaling_factor=vae.config.scaling_factor)


# ---------------------------------------------------------------- classifier (the judge)


def classifier_augment(x: torch.Tensor, vae, gen: torch.Generator) -> torch.Tensor:
    """Cover the gap between crisp procedural images and soft generated ones: VAE round trips, blur, noise."""
    n = len(x)
    with torch.no_grad():
        use_vae = torch.rand(n, generator=gen) < 0.5
        if use_vae.any():
            z = vae.encode(x[use_vae]).latent_dist.sample(generator=gen)
            x = x.clone()
            x[use_vae] = vae.decode(z).sample.clamp(-1, 1)
        sigma = torch.rand(n, generator=gen) * 1.2 * (torch.rand(n, generator=gen) < 0.5)
        x = blur(x, sigma)
        x = x + torch.randn(x.shape, generator=gen) * 0.08 * torch.rand(n, 1, 1, 1, generator=gen)
        x = x * (1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=gen) - 0.5))  # contrast jitter
    return x.clamp(-1, 1)


def build_classifier(out: str, vae_dir: str, steps: int, seed: int, n_eval: int, batch: int = 128):
    from diffusers import AutoencoderKL
    from transformers import ResNetConfig, ResNetForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    config = ResNetConfig(
        num_channels=3,
        embedding_size=32,
        hidden_sizes=[32, 64, 128],
        depths=[1, 1, 1],
        layer_type="basic",
        num_labels=len(pictonette.CLASSES),
        id2label=dict(enumerate(pictonette.CLASSES)),
        label2id={c: i for i, c in enumerate(pictonette.CLASSES)},
    )
    model = ResNetForImageClassification(config)
    # The processor upsamples 32 -> 64 so the ResNet stem (stride 4) keeps the icons' details.
    processor = ViTImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2
    )  # bilinear
    print(f"classifier: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    data = data_pool(min(steps * batch, 50000), seed=2)
    pool, labels = to_tensor(data["images"]), torch.from_numpy(data["labels"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in (bar := tqdm(range(steps), desc="classifier")):
        idx = torch.randint(len(pool), (batch,), generator=gen)
        x = classifier_augment(pool[idx], vae, gen)
        x = F.interpolate(x, size=64, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(model(pixel_values=x).logits, labels[idx], label_smoothing=0.05)
        train_step(opt, sched, loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    held = pictonette.make(n_eval, seed=1002)
    x, y = to_tensor(held["images"]), torch.from_numpy(held["labels"])
    with torch.no_grad():
        acc = classify(model, x).eq(y).float().mean().item()
        z = vae.encode(x).latent_dist.mode()
        acc_vae = classify(model, vae.decode(z).sample.clamp(-1, 1)).eq(y).float().mean().item()
    print(f"classifier: held-out top-1 {acc:.4f} on real images, {acc_vae:.4f} on their VAE reconstructions")
    return dict(classifier_acc_real=acc, classifier_acc_vae=acc_vae)


def classify(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Top-1 class of images in [-1, 1] at 32x32 (same preprocessing as the saved processor)."""
    preds = []
    for i in range(0, len(x), batch):
        xi = F.interpolate(x[i : i + batch], size=64, mode="bilinear", align_corners=False)
        preds.append(model(pixel_values=xi).logits.argmax(-1))
    return torch.cat(preds)


# ---------------------------------------------------------------- CLIP


def build_clip(out: str, tok_dir: str, steps: int, seed: int, n_eval: int, batch: int = 256):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    text_cfg = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=128,
    )
    vision_cfg = dict(
        image_size=32,
        patch_size=4,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        projection_dim=128,
    )
    model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=128))
    print(f"clip: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    data = data_pool(min(steps * batch, 60000), seed=3)
    pool = to_tensor(data["images"])
    ids = tok(
        data["captions"], padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in (bar := tqdm(range(steps), desc="clip")):
        idx = torch.randint(len(pool), (batch,), generator=gen)
        x = pool[idx]
        x = blur(x, torch.rand(batch, generator=gen) * (torch.rand(batch, generator=gen) < 0.3))
        outputs = model(input_ids=ids[idx], pixel_values=x)
        # Several images share a caption: every pair with equal captions is a positive (multi-positive InfoNCE).
        same = (ids[idx][:, None, :] == ids[idx][None, :, :]).all(-1).float()
        loss = contrastive_loss(outputs.logits_per_image, same)
        train_step(opt, sched, loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    model.eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
            do_convert_rgb=True,
        ),
        tokenizer=tok,
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    acc = clip_zero_shot_accuracy(model, tok, pictonette.make(n_eval, seed=1003))
    print(f"clip: zero-shot top-1 ('an image of a {{class}}') on held-out images {acc:.4f}")
    return dict(clip_zero_shot_acc=acc)


def clip_zero_shot_accuracy(model, tok, held) -> float:
    prompts = [f"an image of a {c}" for c in pictonette.CLASSES]
    with torch.no_grad():
        t = model.get_text_features(**tok(prompts, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt"))
        v = model.get_image_features(pixel_values=to_tensor(held["images"]))
        pred = (F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T).argmax(-1)
    return pred.eq(torch.from_numpy(held["labels"])).float().mean().item()


def build_clip_vision(clip_dir: str, text_encoder_dir: str, steps: int, seed: int, n_eval: int, batch: int = 256):
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    model = CLIPModel.from_pretrained(clip_dir)
    # The text tower (text_model) becomes tiny-sd's text encoder, as the `unet` stage trained it, and stays frozen, so
    # the two are byte-identical. The text projection is not part of SD's CLIPTextModel, so it trains with the vision
    # tower.
    model.text_model.load_state_dict(CLIPTextModel.from_pretrained(text_encoder_dir).text_model.state_dict())
    model.text_model.requires_grad_(False)
    data = data_pool(min(steps * batch, 60000), seed=5)
    pool = to_tensor(data["images"])
    captions = sorted(set(data["captions"]))
    cap_idx = torch.tensor([captions.index(c) for c in data["captions"]])
    with torch.no_grad():  # the text tower is frozen: its pooled states are computed once per caption
        ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
        pooled = model.text_model(**ids).pooler_output  # (n_captions, 128)
    # What each caption states and what each image shows, as integer codes (-1: the caption states nothing).
    colours = list(pictonette.COLORS)
    cons = [pictonette.caption_constraints(c) for c in captions]
    c_label, c_bg, c_obj, c_sketch = torch.tensor(
        [[c[0], colours.index(c[1]) if c[1] else -1, colours.index(c[2]) if c[2] else -1, c[3]] for c in cons]
    ).T
    i_label = torch.from_numpy(data["labels"])
    i_bg = torch.tensor([colours.index(b) for b in data["backgrounds"]])
    i_obj = torch.tensor([colours.index(o) for o in data["objects"]])
    i_sketch = torch.tensor([s == "sketch" for s in data["styles"]])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup=20))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in (bar := tqdm(range(steps), desc="clip_vision")):
        idx = torch.randint(len(pool), (batch,), generator=gen)
        x = blur(pool[idx], torch.rand(batch, generator=gen) * (torch.rand(batch, generator=gen) < 0.3))
        img = F.normalize(model.get_image_features(pixel_values=x), dim=-1)
        t = F.normalize(model.text_projection(pooled[cap_idx[idx]]), dim=-1)
        # target[i, j] = 1 when image i shows everything caption j states (caption i always matches image i)
        cj = cap_idx[idx]
        match = (
            (i_label[idx, None] == c_label[None, cj])
            & ((c_bg[None, cj] < 0) | (i_bg[idx, None] == c_bg[None, cj]))
            & ((c_obj[None, cj] < 0) | (i_obj[idx, None] == c_obj[None, cj]))
            & ((c_sketch[None, cj] == 0) | i_sketch[idx, None])
        ).float()
        loss = contrastive_loss(model.logit_scale.exp() * img @ t.T, match)
        train_step(opt, sched, loss)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.save_pretrained(clip_dir, safe_serialization=True)
    acc = clip_zero_shot_accuracy(model, tok, pictonette.make(n_eval, seed=1003))
    print(f"clip_vision: zero-shot top-1 ('an image of a {{class}}') on held-out images {acc:.4f}")
    return dict(clip_zero_shot_acc=acc)


# ---------------------------------------------------------------- UNet and the pipeline folder


def unet_config():
    return dict(
        # 8x8 -> 4x4 with attention at 4x4 and in the middle block: 4.0M parameters, about 0.5 s per training step
        # at batch 64 on 2 CPU cores; attention at 8x8 would cost 1.6x the time for little gain on 32x32 icons.
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_unet(
    out: str,
    tok_dir: str,
    vae_dir: str,
    clip_dir: str,
    steps: int,
    seed: int,
    judge_dir: str = None,
    batch: int = 64,
    resume: bool = False,
    lr: float = 5e-4,
    sketch_fraction: float = None,
    train_text: bool = True,
    ckpt_dir: str = None,
):
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tok = CLIPTokenizer.from_pretrained(tok_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    clip = CLIPModel.from_pretrained(clip_dir)
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.text_model.load_state_dict(clip.text_model.state_dict())
    text_encoder.eval().requires_grad_(False)
    # SD v1.4's schedule; from_config keeps SD's DDIM/PNDM keys (set_alpha_to_one, skip_prk_steps) in the config so
    # that DDIMScheduler.from_config(pipe.scheduler.config) behaves as it does on SD.
    scheduler = DDPMScheduler.from_config(
        dict(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            skip_prk_steps=True,
        )
    )
    unet = UNet2DConditionModel(**unet_config())
    if resume:  # --unet_resume: continue from the UNet and text encoder already saved in `out` (their EMA weights)
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).state_dict())
        text_encoder = CLIPTextModel.from_pretrained(os.path.join(out, "text_encoder")).eval().requires_grad_(False)
        seed += 1  # fresh noise and batches
    print(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
    ema = copy.deepcopy(unet).requires_grad_(False)

    # The text encoder starts from CLIP's text tower and trains with the UNet (lower learning rate): contrastive
    # training alone left different classes' states nearly parallel, and a UNet conditioned on them could not tell
    # several classes apart. The `clip_vision` stage then aligns CLIP's vision tower to this text encoder.
    # --no-unet_train_text keeps it frozen (a fine-tune that leaves tiny-clip's text tower valid).
    text_encoder.train(train_text).requires_grad_(train_text)
    text_ema = copy.deepcopy(text_encoder).requires_grad_(False)

    # Cache what is frozen: latents of the whole pool (posterior mean and std) and the token ids of every caption.
    n_pool = min(steps * batch, 80000)
    if sketch_fraction is None:  # Pictonette's own mix: 30% sketches, half of them with a caption that says so
        data = data_pool(n_pool, seed=4)
    else:  # --unet_sketch_fraction: that share of the pool is sketch images (drawn with the sketch templates)
        n_sketch = round(n_pool * sketch_fraction)
        parts = [
            pictonette.make(n_pool - n_sketch, seed=4, style="filled"),
            pictonette.make(n_sketch, 14, style="sketch"),
        ]
        data = {k: [v for part in parts for v in part[k]] for k in ("captions",)}
        data["images"] = np.concatenate([part["images"] for part in parts])
    with torch.no_grad():
        x = to_tensor(data["images"])
        means, stds = [], []
        for i in tqdm(range(0, len(x), 1000), desc="unet: encode pool"):
            post = vae.encode(x[i : i + 1000]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        means, stds = torch.cat(means), torch.cat(stds)
    captions = sorted(set(data["captions"])) + [""]
    index = {c: i for i, c in enumerate(captions)}
    cap_idx = torch.tensor([index[c] for c in data["captions"]])
    cap_ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    empty = index[""]
    sf = vae.config.scaling_factor
    # min-SNR-5 loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy",
    # eq. 9 for epsilon prediction: w_t = min(SNR_t, 5) / SNR_t); they converge several times faster than uniform ones
    snr = scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod)
    weight = snr.clamp(max=5.0) / snr
    opt = torch.optim.AdamW(
        [
            dict(params=unet.parameters(), lr=lr),
            dict(params=text_encoder.parameters(), lr=lr / 5),
        ],
        weight_decay=0.01,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup=200))
    gen = torch.Generator().manual_seed(seed)
    judge = None
    if judge_dir and os.path.isdir(judge_dir):
        from transformers import ResNetForImageClassification

        judge = ResNetForImageClassification.from_pretrained(judge_dir).eval()
    settings = dict(steps=steps, seed=seed, batch=batch, lr=lr, resume=resume, sketch=sketch_fraction, text=train_text)
    ckpt = StageCheckpoint(ckpt_dir, "unet", settings, every=CHECKPOINT_EVERY)
    start = 0
    if state := ckpt.load():
        for module, key in [(unet, "unet"), (ema, "ema"), (text_encoder, "text"), (text_ema, "text_ema")]:
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["gen"])
        start = state["step"]
    unet.train()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    for step in (bar := tqdm(range(start, steps), desc="unet", initial=start, total=steps)):
        idx = torch.randint(len(means), (batch,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf
        cond = cap_idx[idx].clone()
        cond[torch.rand(batch, generator=gen) < 0.1] = empty  # 10% empty prompts for classifier-free guidance
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        zt = scheduler.add_noise(z0, noise, t)
        states = text_encoder(cap_ids[cond])[0]
        per_sample = F.mse_loss(unet(zt, t, states).sample, noise, reduction="none").mean((1, 2, 3))
        loss = (weight[t] * per_sample).mean()
        train_step(opt, sched, loss, clip_params=params)
        decay = min(0.999, (1 + step) / (10 + step))
        ema_update(ema, unet, decay)
        if train_text:
            ema_update(text_ema, text_encoder, decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if judge is not None and ((step + 1) % 1000 == 0 or step == steps - 1):
            acc = probe_accuracy(ema, text_ema, tok, vae, scheduler, judge)
            tqdm.write(f"unet: step {step + 1} generated images judged as their class: {acc:.3f} (10 per class)")
        ckpt.maybe_save(
            step,
            steps,
            unet=unet.state_dict(),
            ema=ema.state_dict(),
            text=text_encoder.state_dict(),
            text_ema=text_ema.state_dict(),
            opt=opt.state_dict(),
            sched=sched.state_dict(),
            gen=gen.get_state(),
        )
    text_encoder = text_ema.eval()
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=ema.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    for part in ("unet", "vae", "text_encoder"):  # from_pretrained records the local path it loaded from: drop it
        path = os.path.join(out, part, "config.json")
        config = json.load(open(path))
        if config.pop("_name_or_path", None) is not None:
            with open(path, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
                f.write("\n")
    ckpt.remove()
    print(f"unet: saved the pipeline to {out}")
    return {}


@torch.no_grad()
def probe_accuracy(unet, text_encoder, tok, vae, scheduler, judge, per_class: int = 10) -> float:
    """Fraction of images sampled from "an image of a {class}" (25 DDIM steps, guidance 7.5) judged as the class."""
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(25)
    was_training = unet.training
    unet.eval()
    prompts = [f"an image of a {c}" for c in pictonette.CLASSES for _ in range(per_class)] + [""]
    ids = tok(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    states = text_encoder(ids)[0]
    cond, uncond = states[:-1], states[-1:].expand(len(prompts) - 1, -1, -1)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(len(prompts) - 1, 4, 8, 8, generator=gen)
    for t in ddim.timesteps:
        eps_c, eps_u = unet(torch.cat([z, z]), t, torch.cat([cond, uncond])).sample.chunk(2)
        z = ddim.step(eps_u + 7.5 * (eps_c - eps_u), t, z).prev_sample
    images = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)
    labels = torch.arange(len(pictonette.CLASSES)).repeat_interleave(per_class)
    unet.train(was_training)
    return classify(judge, images).eq(labels).float().mean().item()


# ---------------------------------------------------------------- quality report


def style_and_background(images: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per image: the fraction of pixels that differ from the background, and the background's colour name.

    The background is the median colour of the 2-pixel border; a sketch covers few pixels, a filled icon many.
    """
    border = np.concatenate(
        [
            images[:, :2].reshape(len(images), -1, 3),
            images[:, -2:].reshape(len(images), -1, 3),
            images[:, :, :2].reshape(len(images), -1, 3),
            images[:, :, -2:].reshape(len(images), -1, 3),
        ],
        1,
    )
    bg = np.median(border.astype(float), axis=1)  # (N, 3)
    coverage = (np.linalg.norm(images.astype(float) - bg[:, None, None], axis=-1) > 60).mean((1, 2))
    names = list(pictonette.COLORS)
    palette = np.array([pictonette.COLORS[n] for n in names], float)
    bg_names = [names[i] for i in np.linalg.norm(bg[:, None] - palette[None], axis=-1).argmin(1)]
    return coverage, bg_names


def train_style_judge(vae, n_train: int, seed: int, steps: int = 600, batch: int = 128):
    """A small CNN (logit > 0: sketch) trained on VAE reconstructions (posterior samples) of n_train real filled and
    n_train real sketch images; returns it and its accuracy on held-out reconstructions (up to 500 per style)."""
    torch.manual_seed(seed)

    def reconstructions(style: str, n: int, data_seed: int) -> torch.Tensor:
        x = to_tensor(pictonette.make(n, seed=data_seed, style=style)["images"])
        with torch.no_grad():
            return torch.cat(
                [
                    vae.decode(vae.encode(x[i : i + 500]).latent_dist.sample()).sample.clamp(-1, 1)
                    for i in range(0, n, 500)
                ]
            )

    x = torch.cat([reconstructions("filled", n_train, seed), reconstructions("sketch", n_train, seed + 1)])
    y = torch.cat([torch.zeros(n_train), torch.ones(n_train)])
    n_held = min(500, n_train)
    held = torch.cat([reconstructions("filled", n_held, seed + 2), reconstructions("sketch", n_held, seed + 3)])
    held_y = torch.cat([torch.zeros(n_held), torch.ones(n_held)])
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="report: style judge"):
        idx = torch.randint(len(x), (batch,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        acc = ((net(held).squeeze(1) > 0).float() == held_y).float().mean().item()
    return net, acc


def sample_pipeline(
    pipe, prompts: list[str], seeds: list[int], batch: int = 100, guidance: float = 7.5, negative: str = ""
) -> np.ndarray:
    """uint8 images of `pipe` (25 DDIM steps if its scheduler is DDIM), image i from prompt i and seed i; guidance
    against the `negative` prompt (the pipeline's default, "", unless given)."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch]]
        res = pipe(
            prompts[i : i + batch],
            negative_prompt=[negative] * len(prompts[i : i + batch]) if negative else None,
            num_inference_steps=25,
            guidance_scale=guidance,
            generator=gens,
            height=32,
            width=32,
            output_type="np",
        )
        out.append((res.images * 255).round().astype(np.uint8))
    return np.concatenate(out)


def report(out: str, n_per_class: int, figures: dict) -> dict:
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image
    from transformers import ResNetForImageClassification

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(out, "tiny-sd"))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    judge = ResNetForImageClassification.from_pretrained(os.path.join(out, "tiny-classifier")).eval()
    classes = pictonette.CLASSES
    seeds = [s for _ in classes for s in range(n_per_class)]
    labels = torch.tensor([c for c in range(len(classes)) for _ in range(n_per_class)])

    def accuracy(template):
        images = sample_pipeline(pipe, [template.format(c) for c in classes for _ in range(n_per_class)], seeds)
        with torch.no_grad():
            pred = classify(judge, to_tensor(images))
        per_class = {c: pred[labels == i].eq(i).float().mean().item() for i, c in enumerate(classes)}
        return images, per_class

    t0 = time.time()
    images, per_class = accuracy("an image of a {}")
    figures["gen_acc_per_class"] = per_class
    figures["gen_acc_mean"] = float(np.mean(list(per_class.values())))
    figures["gen_acc_min"] = float(min(per_class.values()))
    _, per_class_photo = accuracy("a photo of a {}")
    figures["gen_acc_photo_per_class"] = per_class_photo
    figures["gen_acc_photo_mean"] = float(np.mean(list(per_class_photo.values())))
    figures["gen_acc_photo_min"] = float(min(per_class_photo.values()))
    print(f"report: sampling + judging {3 * len(seeds)} images took {time.time() - t0:.0f} s")

    # Style: a small CNN told apart VAE reconstructions of real sketches and of real filled icons (the VAE cannot
    # keep 1-pixel lines crisp, so generated sketches are judged against what the VAE makes of real ones); its
    # accuracy on held-out reconstructions is reported with the rates.
    # (2,000 images per style and 600 steps at the default 50 per class; scaled down with --smoke's 2)
    style_judge, style_acc = train_style_judge(
        pipe.vae, n_train=min(2000, 40 * n_per_class), seed=1006, steps=min(600, 12 * n_per_class)
    )
    figures["style_judge_acc_on_vae_recon"] = style_acc
    n_style = min(20, n_per_class)
    sk_prompts = [f"a sketch of a {c}" for c in classes for _ in range(n_style)]
    sk_seeds = [s for _ in classes for s in range(n_style)]
    sk_images = sample_pipeline(pipe, sk_prompts, sk_seeds)
    with torch.no_grad():
        is_sketch = style_judge(to_tensor(sk_images)).squeeze(1) > 0
        plain_is_sketch = style_judge(to_tensor(images)).squeeze(1) > 0
    figures["sketch_prompt_outline_rate"] = is_sketch.float().mean().item()
    figures["plain_prompt_outline_rate"] = plain_is_sketch.float().mean().item()
    for old in ("sketch_threshold_coverage", "sketch_rule_acc_on_real"):  # the coverage rule this replaced
        figures.pop(old, None)
    rates = {}
    for colour in ["red", "blue", "green", "yellow"]:
        bg_images = sample_pipeline(
            pipe, [f"a {c} on a {colour} background" for c in classes for _ in range(n_style)], sk_seeds
        )
        rates[colour] = float(np.mean([b == colour for b in style_and_background(bg_images)[1]]))
    figures["background_rate"] = rates
    figures["background_rate_mean"] = float(np.mean(list(rates.values())))

    # Sample grids: one row per class, 8 seeds; "an image of a {class}" and "a sketch of a {class}".
    def save_grid(imgs, per_class, name):
        cols = min(8, per_class)
        grid = imgs.reshape(len(classes), per_class, 32, 32, 3)[:, :cols]
        grid = grid.transpose(0, 2, 1, 3, 4).reshape(len(classes) * 32, cols * 32, 3)
        Image.fromarray(grid).resize((cols * 32 * 3, len(classes) * 32 * 3), Image.Resampling.NEAREST).save(
            os.path.join(out, "tiny-sd", name)
        )

    save_grid(images, n_per_class, "samples.png")
    save_grid(sk_images, n_style, "sketch_samples.png")

    # Speed: one UNet forward at batch 64.
    torch.set_grad_enabled(False)
    z = torch.randn(64, 4, 8, 8)
    states = torch.randn(64, MAX_TOKENS, 128)
    t = torch.full((64,), 500)
    for _ in range(3):
        pipe.unet(z, t, states)
    t0 = time.perf_counter()
    for _ in range(20):
        pipe.unet(z, t, states)
    figures["unet_forward_b64_s"] = (time.perf_counter() - t0) / 20
    figures["unet_params_M"] = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    torch.set_grad_enabled(True)
    return figures


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default: data/, or a temporary folder with --smoke)")
    p.add_argument(
        "--smoke",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run every stage for a few iterations into a temporary folder",
    )
    p.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES, help="stages to run (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of every stage")
    p.add_argument("--vae_steps", type=int, default=2500, help="VAE training steps (of --vae_batch images)")
    p.add_argument("--vae_batch", type=int, default=64, help="VAE images per step")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate (cosine schedule)")
    p.add_argument(
        "--vae_resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the vae stage fine-tunes the VAE in <out>/tiny-sd/vae instead of starting afresh",
    )
    p.add_argument(
        "--vae_sketch_fraction",
        type=float,
        default=None,
        help="share of sketch images in the VAE's training pool (default: Pictonette's own 0.3)",
    )
    p.add_argument(
        "--vae_style_margin",
        type=float,
        default=0.0,
        help="hinge that puts style into the latents' spatial mean: sketches and filled icons at least this many "
        "latent standard deviations from a learned threshold, on opposite sides (0: off; build_vae)",
    )
    p.add_argument("--classifier_steps", type=int, default=600, help="classifier training steps (batch 128)")
    p.add_argument("--clip_steps", type=int, default=400, help="CLIP training steps (batch 256)")
    p.add_argument("--unet_steps", type=int, default=5000, help="UNet training steps (batch 64)")
    p.add_argument("--unet_lr", type=float, default=5e-4, help="UNet peak learning rate (text encoder: a fifth)")
    p.add_argument(
        "--unet_resume",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the unet stage continues from the UNet and text encoder in <out>/tiny-sd instead of starting afresh",
    )
    p.add_argument(
        "--unet_sketch_fraction",
        type=float,
        default=None,
        help="share of sketch images in the UNet's training pool (default: Pictonette's own 0.3)",
    )
    p.add_argument(
        "--unet_train_text",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train the text encoder with the UNet (--no-unet_train_text keeps it, and so tiny-clip, unchanged)",
    )
    p.add_argument("--clip_vision_steps", type=int, default=400, help="CLIP vision-tower steps (batch 256)")
    p.add_argument("--n_eval", type=int, default=1000, help="held-out real images for the judge/VAE/CLIP figures")
    p.add_argument("--report_per_class", type=int, default=50, help="generated images per class in the report")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.smoke:
        args.vae_steps, args.classifier_steps, args.clip_steps, args.unet_steps, args.clip_vision_steps = 3, 3, 3, 3, 3
        args.report_per_class, args.n_eval = 2, 20
        if args.out is None:
            args.out = tempfile.mkdtemp(prefix="tiny_smoke_")
    args.out = args.out or HERE
    for name in [
        "vae_steps",
        "vae_batch",
        "classifier_steps",
        "clip_steps",
        "unet_steps",
        "clip_vision_steps",
        "report_per_class",
        "n_eval",
    ]:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ["vae_sketch_fraction", "unet_sketch_fraction"]:
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.vae_style_margin < 0:
        p.error(f"--vae_style_margin must be >= 0, got {args.vae_style_margin}")
    if not args.vae_lr > 0:
        p.error(f"--vae_lr must be > 0, got {args.vae_lr}")
    return args


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out
    tok_dir, vae_dir = os.path.join(out, "tiny-sd", "tokenizer"), os.path.join(out, "tiny-sd", "vae")
    clip_dir, cls_dir = os.path.join(out, "tiny-clip"), os.path.join(out, "tiny-classifier")
    report_path = os.path.join(out, "build_report.json")
    ckpt_dir = os.path.join(out, ".checkpoints")  # mid-stage progress of the vae and unet stages (StageCheckpoint)
    figures = json.load(open(report_path)) if os.path.exists(report_path) else {}
    timings = figures.setdefault("stage_seconds", {})
    print(f"building the tiny world into {out} (stages: {' '.join(args.stages)})")
    for stage in STAGES:
        if stage not in args.stages:
            continue
        t0 = time.time()
        if stage == "tokenizer":
            build_tokenizer(tok_dir)
        elif stage == "vae":
            figures.update(
                build_vae(
                    vae_dir,
                    args.vae_steps,
                    args.seed,
                    args.n_eval,
                    batch=args.vae_batch,
                    ckpt_dir=ckpt_dir,
                    resume=args.vae_resume,
                    lr=args.vae_lr,
                    sketch_fraction=args.vae_sketch_fraction,
                    style_margin=args.vae_style_margin,
                )
            )
        elif stage == "classifier":
            figures.update(build_classifier(cls_dir, vae_dir, args.classifier_steps, args.seed, args.n_eval))
        elif stage == "clip":
            figures.update(build_clip(clip_dir, tok_dir, args.clip_steps, args.seed, args.n_eval))
        elif stage == "unet":
            build_unet(
                os.path.join(out, "tiny-sd"),
                tok_dir,
                vae_dir,
                clip_dir,
                args.unet_steps,
                args.seed,
                cls_dir,
                resume=args.unet_resume,
                lr=args.unet_lr,
                sketch_fraction=args.unet_sketch_fraction,
                train_text=args.unet_train_text,
                ckpt_dir=ckpt_dir,
            )
        elif stage == "clip_vision":
            te_dir = os.path.join(out, "tiny-sd", "text_encoder")
            figures.update(build_clip_vision(clip_dir, te_dir, args.clip_vision_steps, args.seed, args.n_eval))
        elif stage == "report":
            figures = report(out, args.report_per_class, figures)
        timings[stage] = round(time.time() - t0, 1)
        figures["settings"] = {k: v for k, v in vars(args).items() if k not in ("stages",)}
        tmp = report_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(figures, f, indent=2)
        os.replace(tmp, report_path)
        print(f"stage {stage} done in {timings[stage]:.0f} s")
    print(json.dumps({k: v for k, v in figures.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main(parse_args())
