"""Pictonette: deterministic procedural 32x32 pictograms of the 10 Imagenette classes.

The tiny world's dataset. Each class is an icon built from a few shapes (a church has a nave, a gable roof, a
steeple with a spire and a cross; a parachute a scalloped canopy with lines down to a jumper; ...), drawn with a
random position, scale, rotation, object colour and background colour, in one of two styles: `filled` or
`sketch` (the outline of the icon's silhouette). Every image comes with a caption from several templates ("an
image of a church", "a photo of a church", "a sketch of a church on a blue background", ...).

Sample i of seed s depends only on (s, i), so `make(n, seed)` is a prefix of `make(n + 1, seed)`.

    from data.pictonette import make
    batch = make(64, seed=0)  # dict: images (64, 32, 32, 3) uint8, labels, styles, captions, ...

CLI: write an image folder in the project's format ({case_number}_{k}.png + prompts.csv), e.g. as an FID reference:
    python data/pictonette.py runs/real_pictonette --n_per_class 100 --seed 1000
"""

import argparse
import csv
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = [
    "tench",
    "English springer",
    "cassette player",
    "chain saw",
    "church",
    "French horn",
    "garbage truck",
    "gas pump",
    "golf ball",
    "parachute",
]
STYLES = ["filled", "sketch"]
# Named colours: used for the object and the background, and named in captions.
COLORS = {
    "red": (200, 40, 40),
    "orange": (235, 140, 30),
    "yellow": (235, 215, 50),
    "green": (50, 160, 60),
    "blue": (40, 80, 200),
    "purple": (130, 60, 170),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
FILLED_TEMPLATES = [
    "an image of a {c}",
    "a photo of a {c}",
    "a picture of a {c}",
    "{c}",
    "an image of a {c} on a {bg} background",
    "a photo of a {c} on a {bg} background",
    "a {c} on a {bg} background",
    "{a_obj} {c}",
    "{a_obj} {c} on a {bg} background",
]
SKETCH_TEMPLATES = [
    "a sketch of a {c}",
    "a sketch of a {c} on a {bg} background",
    "a drawing of a {c}",
    "an outline of a {c}",
    "an image of a {c}",
    "a photo of a {c}",
    "a picture of a {c}",
    "{c}",
]
SIZE = 32  # output resolution
SUPER = 4  # supersampling factor for anti-aliased edges
# A sketch is the outline of the icon's silhouette, this many output pixels wide, drawn inside its edge. Not every
# shape's outline: inner details' 1-pixel lines, 1-2 pixels apart, are more than a 4x8x8 latent can carry, and a
# model that cannot draw them turns "a sketch of a church" into a filled church under guidance (data/README.md).
SKETCH_RING = 1.5


# ---------------------------------------------------------------- icons
# An icon is a list of primitives in a frame where the object spans about [-1, 1] (y points down):
#   ("poly", points, value)          filled polygon; value 1 draws the object, 0 cuts a detail out of it
#   ("line", points, width, value)   polyline of the given width
# In the sketch style the shapes drawn with value 1 make a silhouette, and the sketch is its outline.


def ellipse(cx, cy, rx, ry, a0=0.0, a1=360.0, n=28):
    """Points of an ellipse (or an arc from a0 to a1 degrees)."""
    angles = np.radians(np.linspace(a0, a1, n, endpoint=(a1 - a0) < 360))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def icon_tench():
    body = ("poly", ellipse(-0.1, 0.0, 0.68, 0.34), 1)
    tail = ("poly", [(0.45, 0.0), (0.95, -0.38), (0.85, 0.0), (0.95, 0.38)], 1)
    fin_top = ("poly", [(-0.25, -0.28), (0.1, -0.55), (0.25, -0.25)], 1)
    fin_bottom = ("poly", [(-0.05, 0.28), (0.15, 0.5), (0.25, 0.26)], 1)
    eye = ("poly", ellipse(-0.55, -0.08, 0.08, 0.08, n=12), 0)
    gill = ("line", ellipse(-0.35, 0.0, 0.18, 0.26, 290, 430, n=10), 0.06, 0)
    return [body, tail, fin_top, fin_bottom, eye, gill]


def icon_springer():
    body = ("poly", ellipse(0.1, 0.05, 0.55, 0.25), 1)
    head = ("poly", ellipse(-0.55, -0.35, 0.24, 0.22), 1)
    snout = ("poly", [(-0.72, -0.4), (-0.98, -0.3), (-0.95, -0.18), (-0.65, -0.2)], 1)
    neck = ("poly", [(-0.5, -0.2), (-0.25, -0.12), (-0.25, 0.15), (-0.5, -0.05)], 1)
    ear = ("poly", ellipse(-0.42, -0.18, 0.1, 0.24, n=16), 0)
    legs = [
        ("line", [(x, 0.2), (x + dx, 0.85)], 0.13, 1)
        for x, dx in [(-0.3, -0.05), (-0.1, 0.02), (0.4, -0.02), (0.55, 0.06)]
    ]
    tail = ("line", [(0.62, -0.05), (0.85, -0.3), (0.95, -0.35)], 0.09, 1)
    eye = ("poly", ellipse(-0.62, -0.42, 0.05, 0.05, n=10), 0)
    return [body, head, snout, neck, ear, *legs, tail, eye]


def icon_cassette():
    case = ("poly", rect(-0.95, -0.55, 0.95, 0.6), 1)
    window = ("poly", rect(-0.55, -0.3, 0.55, 0.15), 0)
    reels = [("poly", ellipse(x, -0.07, 0.2, 0.2, n=16), 1) for x in (-0.32, 0.32)]
    hubs = [("poly", ellipse(x, -0.07, 0.08, 0.08, n=10), 0) for x in (-0.32, 0.32)]
    buttons = [("poly", rect(x, -0.8, x + 0.22, -0.55), 1) for x in (-0.75, -0.45, -0.15, 0.15)]
    handle = ("line", [(0.4, -0.55), (0.45, -0.85), (0.85, -0.85), (0.9, -0.55)], 0.1, 1)
    slot = ("poly", rect(-0.6, 0.32, 0.6, 0.45), 0)
    return [case, window, *reels, *hubs, *buttons, handle, slot]


def icon_chainsaw():
    engine = ("poly", rect(-0.95, -0.35, -0.15, 0.35), 1)
    handle = ("line", [(-0.85, -0.35), (-0.75, -0.75), (-0.3, -0.75), (-0.2, -0.35)], 0.12, 1)
    bar = ("poly", [(-0.15, -0.18), (0.85, -0.14), (0.97, 0.0), (0.85, 0.14), (-0.15, 0.18)], 1)
    teeth_top = [("poly", [(x, -0.16), (x + 0.07, -0.3), (x + 0.14, -0.15)], 1) for x in np.arange(-0.1, 0.8, 0.18)]
    teeth_bottom = [("poly", [(x, 0.16), (x + 0.07, 0.3), (x + 0.14, 0.15)], 1) for x in np.arange(-0.1, 0.8, 0.18)]
    groove = ("line", [(-0.05, 0.0), (0.8, 0.0)], 0.06, 0)
    grip = ("poly", rect(-0.8, 0.35, -0.45, 0.7), 1)
    return [engine, handle, bar, *teeth_top, *teeth_bottom, groove, grip]


def icon_church():
    nave = ("poly", rect(-0.85, -0.05, 0.35, 0.9), 1)
    roof = ("poly", [(-0.95, -0.05), (-0.25, -0.5), (0.45, -0.05)], 1)
    tower = ("poly", rect(0.35, -0.35, 0.8, 0.9), 1)
    spire = ("poly", [(0.3, -0.35), (0.575, -0.85), (0.85, -0.35)], 1)
    cross = [("line", [(0.575, -0.85), (0.575, -1.15)], 0.08, 1), ("line", [(0.47, -1.05), (0.68, -1.05)], 0.08, 1)]
    door = ("poly", [*rect(-0.35, 0.9, -0.05, 0.5)[:2], *ellipse(-0.2, 0.5, 0.15, 0.15, 0, -180, n=10)], 0)
    windows = [("poly", rect(x, 0.2, x + 0.12, 0.4), 0) for x in (-0.7, 0.05)]
    return [nave, roof, tower, spire, *cross, door, *windows]


def icon_horn():
    coil = ("line", ellipse(-0.15, 0.05, 0.55, 0.55, n=32) + [ellipse(-0.15, 0.05, 0.55, 0.55, n=32)[0]], 0.16, 1)
    inner = ("line", ellipse(-0.15, 0.05, 0.3, 0.3, n=24) + [ellipse(-0.15, 0.05, 0.3, 0.3, n=24)[0]], 0.1, 1)
    bell = ("poly", [(0.3, -0.25), (0.9, -0.75), (1.0, -0.55), (0.98, -0.2), (0.42, -0.08)], 1)
    pipe = ("line", [(-0.7, 0.05), (-0.95, 0.35), (-0.8, 0.55)], 0.1, 1)
    valves = [("poly", rect(x, -0.7, x + 0.1, -0.45), 1) for x in (-0.35, -0.15, 0.05)]
    return [coil, inner, bell, pipe, *valves]


def icon_garbage_truck():
    box = ("poly", rect(-0.95, -0.6, 0.3, 0.45), 1)
    cab = ("poly", [(0.35, -0.25), (0.75, -0.25), (0.98, 0.05), (0.98, 0.45), (0.35, 0.45)], 1)
    window = ("poly", [(0.45, -0.15), (0.7, -0.15), (0.85, 0.05), (0.45, 0.05)], 0)
    stripes = [("line", [(-0.85, y), (0.2, y)], 0.07, 0) for y in (-0.3, 0.0, 0.25)]
    wheels = [("poly", ellipse(x, 0.55, 0.2, 0.2, n=16), 1) for x in (-0.65, -0.15, 0.7)]
    hubs = [("poly", ellipse(x, 0.55, 0.07, 0.07, n=10), 0) for x in (-0.65, -0.15, 0.7)]
    return [box, cab, window, *stripes, *wheels, *hubs]


def icon_gas_pump():
    body = ("poly", rect(-0.6, -0.85, 0.25, 0.8), 1)
    screen = ("poly", rect(-0.45, -0.65, 0.1, -0.25), 0)
    base = ("poly", rect(-0.75, 0.8, 0.4, 0.98), 1)
    hose = ("line", [(0.25, -0.3), (0.55, -0.3), (0.65, 0.0), (0.6, 0.45), (0.75, 0.6)], 0.09, 1)
    nozzle = ("poly", [(0.45, -0.55), (0.85, -0.55), (0.9, -0.3), (0.75, -0.3), (0.72, -0.45), (0.45, -0.45)], 1)
    label = ("poly", rect(-0.45, 0.0, 0.1, 0.12), 0)
    return [body, screen, base, hose, nozzle, label]


def icon_golf_ball():
    ball = ("poly", ellipse(0.0, -0.2, 0.62, 0.62, n=32), 1)
    dimples = [("poly", ellipse(x, y, 0.07, 0.07, n=8), 0) for x in (-0.3, 0.0, 0.3) for y in (-0.5, -0.2, 0.1)]
    tee = ("poly", [(-0.3, 0.42), (0.3, 0.42), (0.06, 0.55), (0.06, 0.95), (-0.06, 0.95), (-0.06, 0.55)], 1)
    return [ball, *dimples, tee]


def icon_parachute():
    arc = ellipse(0.0, -0.2, 0.95, 0.7, 180, 360, n=24)
    scallops = []
    for i in range(4):  # scalloped lower edge of the canopy
        cx = -0.95 + 0.2375 + i * 0.475
        scallops += ellipse(cx, -0.2, 0.2375, 0.12, 0, 180, n=8)[::-1]
    canopy = ("poly", arc + scallops[::-1], 1)
    lines = [("line", [(x, -0.15), (0.0, 0.55)], 0.05, 1) for x in (-0.9, -0.45, 0.45, 0.9)]
    gores = [("line", [(x, -0.2), (x * 0.6, -0.8)], 0.05, 0) for x in (-0.47, 0.0, 0.47)]
    jumper = ("poly", ellipse(0.0, 0.72, 0.12, 0.2, n=12), 1)
    head = ("poly", ellipse(0.0, 0.45, 0.09, 0.09, n=10), 1)
    return [canopy, *lines, *gores, jumper, head]


ICONS = [
    icon_tench,
    icon_springer,
    icon_cassette,
    icon_chainsaw,
    icon_church,
    icon_horn,
    icon_garbage_truck,
    icon_gas_pump,
    icon_golf_ball,
    icon_parachute,
]
_ICON_CACHE = [f() for f in ICONS]


# ---------------------------------------------------------------- rendering


def render_mask(label: int, style: str, scale: float, angle: float, dx: float, dy: float, flip: bool) -> np.ndarray:
    """Anti-aliased object mask in [0, 1] of shape (SIZE, SIZE)."""
    big = SIZE * SUPER
    half = big / 2
    c, s = math.cos(angle), math.sin(angle)

    def tr(points):  # icon units -> canvas pixels: flip, rotate, scale, translate
        out = []
        for x, y in points:
            x = -x if flip else x
            xr, yr = c * x - s * y, s * x + c * y
            out.append((half + (xr * scale + dx) * half, half + (yr * scale + dy) * half))
        return out

    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for prim in _ICON_CACHE[label]:
        value = prim[-1]
        if style == "sketch" and value == 0:  # cut-out details are inside the silhouette
            continue
        if prim[0] == "poly":
            draw.polygon(tr(prim[1]), fill=255 * value)
        else:
            draw.line(tr(prim[1]), fill=255 * value, width=max(1, round(prim[2] * scale * half)), joint="curve")
    if style == "sketch":  # the silhouette less its erosion by SKETCH_RING pixels: the ring inside its edge
        r = round(SKETCH_RING * SUPER)
        inner = np.asarray(img.filter(ImageFilter.MinFilter(2 * r + 1)), np.int16)
        img = Image.fromarray((np.asarray(img, np.int16) - inner).astype(np.uint8))
    small = img.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _contrast_ok(a: str, b: str) -> bool:
    ca, cb = np.array(COLORS[a], float), np.array(COLORS[b], float)
    return a != b and np.linalg.norm(ca - cb) > 120


def sample_params(rng: np.random.Generator, label=None, style=None, background=None):
    """Draw one sample's random parameters (class, style, colours, pose, caption template)."""
    label = int(rng.integers(len(CLASSES))) if label is None else label
    style = STYLES[int(rng.random() < 0.3)] if style is None else style
    names = list(COLORS)
    bg = names[int(rng.integers(len(names)))] if background is None else background
    obj_choices = [n for n in names if _contrast_ok(n, bg)]
    obj = obj_choices[int(rng.integers(len(obj_choices)))]
    scale = float(rng.uniform(0.6, 0.85))
    angle = math.radians(float(rng.uniform(-25, 25)))
    room = 1.0 - scale * 0.95
    dx, dy = (float(v) for v in rng.uniform(-room, room, size=2))
    flip = bool(rng.random() < 0.5)
    templates = FILLED_TEMPLATES if style == "filled" else SKETCH_TEMPLATES
    template = templates[int(rng.integers(len(templates)))]
    jitter = rng.normal(0, 12, size=(2, 3))
    return dict(
        label=label,
        style=style,
        bg=bg,
        obj=obj,
        scale=scale,
        angle=angle,
        dx=dx,
        dy=dy,
        flip=flip,
        template=template,
        jitter=jitter,
    )


def render(p: dict) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8 image for one sample's parameters."""
    mask = render_mask(p["label"], p["style"], p["scale"], p["angle"], p["dx"], p["dy"], p["flip"])[..., None]
    bg = np.clip(np.array(COLORS[p["bg"]], float) + p["jitter"][0], 0, 255)
    fg = np.clip(np.array(COLORS[p["obj"]], float) + p["jitter"][1], 0, 255)
    img = bg * (1 - mask) + fg * mask
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def caption(p: dict) -> str:
    a_obj = ("an " if p["obj"][0] in "aeiou" else "a ") + p["obj"]
    return p["template"].format(c=CLASSES[p["label"]], bg=p["bg"], a_obj=a_obj)


def make(n: int, seed: int, classes=None, style=None, background=None) -> dict:
    """n samples for `seed`: images (n, 32, 32, 3) uint8, labels (n,) int64, styles, captions, backgrounds, objects
    (the object colour names)

    classes: optional list of class indices or names to draw from (round-robin: sample i is classes[i % k]);
    style: force "filled" or "sketch"; background: force a colour name.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style {style!r}; accepted: {STYLES}")
    if background is not None and background not in COLORS:
        raise ValueError(f"unknown background {background!r}; accepted: {list(COLORS)}")
    if classes is not None:
        classes = [class_index(c) for c in classes]
    images = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    labels, styles, captions, backgrounds, objects = [], [], [], [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        label = None if classes is None else classes[i % len(classes)]
        p = sample_params(rng, label=label, style=style, background=background)
        images[i] = render(p)
        labels.append(p["label"])
        styles.append(p["style"])
        captions.append(caption(p))
        backgrounds.append(p["bg"])
        objects.append(p["obj"])
    return dict(
        images=images,
        labels=np.array(labels, np.int64),
        styles=styles,
        captions=captions,
        backgrounds=backgrounds,
        objects=objects,
    )


def caption_constraints(caption: str) -> tuple:
    """What a caption states about its image: (class index, background or None, object colour or None, is_sketch).
    Captions never state the template's wording ("photo", "picture"), which no image shows."""
    words = caption.lower()
    label = next(i for i in range(len(CLASSES) - 1, -1, -1) if CLASSES[i].lower() in words)
    bg = next((c for c in COLORS if f"on a {c} background" in words), None)
    obj = next((c for c in COLORS if words.startswith((f"a {c} ", f"an {c} "))), None)
    return label, bg, obj, any(w in words for w in ("sketch", "drawing", "outline"))


def caption_matches(caption: str, label: int, style: str, background: str, obj: str) -> bool:
    """Whether an image with these attributes shows everything the caption states."""
    c_label, c_bg, c_obj, c_sketch = caption_constraints(caption)
    return (
        c_label == label and c_bg in (None, background) and c_obj in (None, obj) and (not c_sketch or style == "sketch")
    )


def class_index(c) -> int:
    """Class index from an index or a name (case-insensitive)."""
    if isinstance(c, (int, np.integer)):
        if not 0 <= c < len(CLASSES):
            raise ValueError(f"class index {c} out of range 0..{len(CLASSES) - 1}")
        return int(c)
    lower = [x.lower() for x in CLASSES]
    if str(c).lower() not in lower:
        raise ValueError(f"unknown class {c!r}; accepted: {CLASSES}")
    return lower.index(str(c).lower())


def vocabulary() -> list[str]:
    """Every word the captions use (lower case), for the tiny tokenizer."""
    words = set()
    for t in FILLED_TEMPLATES + SKETCH_TEMPLATES:
        for c in CLASSES:
            for bg in COLORS:
                for obj in COLORS:
                    words.update(t.format(c=c, bg=bg, a_obj="an " + obj).lower().split())
    return sorted(words)


def write_folder(out_dir: str, n_per_class: int, seed: int, classes=None, style=None) -> None:
    """Write real images as an image folder: one prompts.csv row per class, {case_number}_{k}.png."""
    classes = list(range(len(CLASSES))) if not classes else [class_index(c) for c in classes]
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for case_number, label in enumerate(classes):
        data = make(n_per_class, seed=seed * 1000 + label, classes=[label], style=style)
        for k in range(n_per_class):
            Image.fromarray(data["images"][k]).save(os.path.join(out_dir, f"{case_number}_{k}.png"))
        rows.append(
            dict(
                case_number=case_number,
                prompt=f"an image of a {CLASSES[label]}",
                evaluation_seed=seed * 1000 + label,
                **{"class": CLASSES[label]},
            )
        )
    tmp = os.path.join(out_dir, "prompts.csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case_number", "prompt", "evaluation_seed", "class"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, os.path.join(out_dir, "prompts.csv"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write ({case_number}_{k}.png + prompts.csv)")
    parser.add_argument("--n_per_class", type=int, default=100, help="images per class")
    parser.add_argument("--seed", type=int, default=1000, help="dataset seed (training uses seeds below 1000)")
    parser.add_argument("--classes", nargs="*", default=None, help="class names to write (default: all 10)")
    parser.add_argument("--style", choices=STYLES, default=None, help="force one style (default: both)")
    args = parser.parse_args(argv)
    if args.n_per_class < 1:
        parser.error(f"--n_per_class must be >= 1, got {args.n_per_class}")
    try:
        write_folder(args.out_dir, args.n_per_class, args.seed, args.classes, args.style)
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.n_per_class} images per class to {args.out_dir}")


if __name__ == "__main__":
    main()
