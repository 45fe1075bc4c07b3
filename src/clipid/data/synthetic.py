"""A procedural fashion data set drawn with Pillow: the pipeline's data when there is no other.

Every item is a garment with a caption-level description (category, colour, pattern) and small
details that only the image shows (logo shape and place, stripe spacing, trim colour, pocket,
buttons): many items share a description but are still different identities, as in a real shop.
Each view moves, scales, rotates, relights and sometimes occludes the garment on a new
background. Raw captions are noisy the way scraped captions are.

Deterministic: every image is drawn from its own seed ``(seed, item, view)``, so the output does
not depend on the number of worker processes, and adding views does not change earlier ones.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from clipid.config import ConfigError, SyntheticParams

__all__ = ["CATEGORIES", "COLOURS", "PATTERNS", "generate", "item_spec", "draw_view"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 40), "blue": (30, 70, 200), "green": (40, 150, 60),
    "yellow": (235, 205, 40), "black": (25, 25, 25), "white": (240, 240, 235),
    "grey": (130, 130, 135), "pink": (240, 130, 170), "orange": (240, 130, 30),
    "purple": (120, 50, 160), "brown": (120, 75, 40), "navy": (20, 30, 90),
}
PATTERNS = ("solid", "stripes", "dots", "checks", "zigzag")
CATEGORIES = ("t-shirt", "shirt", "dress", "trousers", "skirt", "jacket", "hoodie", "shorts")
LOGOS = ("none", "circle", "square", "triangle", "star")

# Garment outlines on a unit canvas (x, y in 0..1), drawn at the view's scale and position.
_SHAPES: dict[str, list[tuple[float, float]]] = {
    "t-shirt": [(.30, .15), (.42, .12), (.58, .12), (.70, .15), (.90, .32), (.80, .42),
                (.70, .36), (.70, .88), (.30, .88), (.30, .36), (.20, .42), (.10, .32)],
    "shirt": [(.32, .12), (.45, .10), (.55, .10), (.68, .12), (.88, .30), (.92, .78),
              (.82, .80), (.72, .40), (.72, .90), (.28, .90), (.28, .40), (.18, .80),
              (.08, .78), (.12, .30)],
    "dress": [(.38, .08), (.62, .08), (.66, .30), (.60, .42), (.86, .92), (.14, .92),
              (.40, .42), (.34, .30)],
    "trousers": [(.28, .08), (.72, .08), (.80, .92), (.58, .92), (.50, .38), (.42, .92),
                 (.20, .92)],
    "skirt": [(.34, .22), (.66, .22), (.86, .80), (.14, .80)],
    "jacket": [(.30, .12), (.70, .12), (.92, .32), (.94, .86), (.80, .86), (.76, .44),
               (.76, .92), (.24, .92), (.24, .44), (.20, .86), (.06, .86), (.08, .32)],
    "hoodie": [(.40, .05), (.60, .05), (.68, .16), (.90, .34), (.92, .82), (.80, .82),
               (.74, .42), (.74, .90), (.26, .90), (.26, .42), (.20, .82), (.08, .82),
               (.10, .34), (.32, .16)],
    "shorts": [(.24, .25), (.76, .25), (.84, .70), (.56, .70), (.50, .50), (.44, .70),
               (.16, .70)],
}
_TOPS = {"t-shirt", "shirt", "jacket", "hoodie", "dress"}
_PAIRS = {"trousers", "shorts"}  # plural nouns: "a pair of ..."

# What scraped captions look like.
_HTML = ("<b>", "</b>", "<br/>", "&amp;", "&nbsp;", "<p>", "</p>", "<span class='x'>")
_EMOJI = ("\U0001f525", "\u2728", "\U0001f60d", "\U0001f457", "\U0001f455", "\u2764\ufe0f")
_FILLER = ("new arrival", "best seller", "limited edition", "free shipping", "must have")


def item_spec(seed: int, item: int) -> dict[str, Any]:
    """The look of one item: drawn from its own seed, independent of every other item."""
    rng = np.random.default_rng([seed, item, 0])
    colours = list(COLOURS)

    def other(*avoid: str) -> str:
        # A detail in the garment's own colour would be invisible yet still described in words.
        return str(rng.choice([c for c in colours if c not in avoid]))

    colour = colours[rng.integers(len(colours))]
    secondary = other(colour)
    trim = other(colour)
    category = CATEGORIES[rng.integers(len(CATEGORIES))]
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    # A plain garment always carries a logo: its continuous position keeps two items apart.
    logos = LOGOS[1:] if pattern == "solid" else LOGOS
    return {
        "category": category,
        "colour": colour,
        "secondary": secondary,
        "pattern": pattern,
        "spacing": int(rng.integers(4, 11)),          # stripe / dot / check period (1/64ths)
        "angle": float(rng.choice([0.0, 45.0, 90.0, 135.0])),
        "logo": logos[rng.integers(len(logos))],
        "logo_colour": other(colour, secondary),
        "logo_pos": (float(rng.uniform(.38, .62)), float(rng.uniform(.30, .55))),
        "trim": trim,
        "pocket": bool(rng.random() < 0.4),
        "buttons": int(rng.integers(0, 4)) if category in _TOPS else 0,
    }


def describe(spec: dict[str, Any]) -> str:
    """The item's clean description: what a shop's attribute table would say."""
    pattern = {"solid": "", "stripes": "striped ", "dots": "polka dot ", "checks": "checked ",
               "zigzag": "zigzag "}[spec["pattern"]]
    article = "an" if spec["colour"][0] in "aeiou" else "a"
    if spec["category"] in _PAIRS:
        article = "a pair of"
    details = [f"{spec['trim']} trim"]
    if spec["pattern"] != "solid":
        details.insert(0, f"{spec['secondary']} {spec['pattern']}")
    if spec["pocket"]:
        details.append("a pocket")
    if spec["logo"] != "none":
        details.append(f"a {spec['logo_colour']} {spec['logo']} logo")
    listed = details[0] if len(details) == 1 else f"{', '.join(details[:-1])} and {details[-1]}"
    return f"{article} {spec['colour']} {pattern}{spec['category']} with {listed}"


def _pattern_layer(spec: dict[str, Any], size: int) -> Image.Image:
    """The fabric: base colour plus the item's pattern, on a square the garment is cut from."""
    base, second = COLOURS[spec["colour"]], COLOURS[spec["secondary"]]
    big = size * 2  # drawn larger and rotated so stripes at an angle cover the whole garment
    fabric = Image.new("RGB", (big, big), base)
    draw = ImageDraw.Draw(fabric)
    period = max(3, spec["spacing"] * size // 64)
    if spec["pattern"] == "stripes":
        for x in range(0, big, period):
            draw.rectangle([x, 0, x + period // 2 - 1, big], fill=second)
    elif spec["pattern"] == "dots":
        r = max(1, period // 4)
        for y in range(0, big, period):
            for x in range((y // period % 2) * period // 2, big, period):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=second)
    elif spec["pattern"] == "checks":
        for y in range(0, big, period):
            for x in range(0, big, period):
                if (x // period + y // period) % 2:
                    draw.rectangle([x, y, x + period - 1, y + period - 1], fill=second)
    elif spec["pattern"] == "zigzag":
        for y in range(0, big, period):
            points = [(x, y + (period // 2 if (x // period) % 2 else 0))
                      for x in range(0, big + period, period)]
            draw.line(points, fill=second, width=max(1, period // 4))
    if spec["angle"]:
        fabric = fabric.rotate(spec["angle"], resample=Image.Resampling.NEAREST)
    return fabric.crop((size // 2, size // 2, size // 2 + size, size // 2 + size))


def _logo(draw: ImageDraw.ImageDraw, spec: dict[str, Any], size: int) -> None:
    if spec["logo"] == "none":
        return
    cx, cy = spec["logo_pos"][0] * size, spec["logo_pos"][1] * size
    r = size * 0.07
    fill = COLOURS[spec["logo_colour"]]
    box = [cx - r, cy - r, cx + r, cy + r]
    if spec["logo"] == "circle":
        draw.ellipse(box, fill=fill)
    elif spec["logo"] == "square":
        draw.rectangle(box, fill=fill)
    elif spec["logo"] == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    else:  # star
        points = [(cx + (r if k % 2 == 0 else r / 2.4) * math.sin(k * math.pi / 5),
                   cy - (r if k % 2 == 0 else r / 2.4) * math.cos(k * math.pi / 5))
                  for k in range(10)]
        draw.polygon(points, fill=fill)


def _garment(spec: dict[str, Any], size: int) -> Image.Image:
    """The garment alone, RGBA on a transparent square."""
    outline = [(x * size, y * size) for x, y in _SHAPES[spec["category"]]]
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    # Details go on the fabric before it is cut out, so none floats off the garment (e.g. a
    # logo between trouser legs).
    fabric = _pattern_layer(spec, size)
    draw = ImageDraw.Draw(fabric)
    if spec["pocket"]:
        px, py = 0.56 * size, 0.55 * size
        draw.rectangle([px, py, px + size * .1, py + size * .1],
                       outline=COLOURS[spec["trim"]], width=max(1, size // 64))
    for b in range(spec["buttons"]):
        y = (0.3 + 0.15 * b) * size
        draw.ellipse([0.49 * size, y, 0.53 * size, y + 0.04 * size], fill=COLOURS[spec["trim"]])
    _logo(draw, spec, size)
    garment = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    garment.paste(fabric, (0, 0), mask)
    ImageDraw.Draw(garment).line(outline + [outline[0]], fill=COLOURS[spec["trim"]],
                                 width=max(1, size // 40))
    return garment


def draw_view(spec: dict[str, Any], seed: int, item: int, view: int, size: int) -> Image.Image:
    """One photo of an item: its own background, pose, light and occlusion."""
    rng = np.random.default_rng([seed, item, view + 1])
    bg_a = tuple(int(v) for v in rng.integers(60, 256, 3))
    bg_b = tuple(int(min(255, max(0, c + rng.integers(-40, 41)))) for c in bg_a)
    # A vertical gradient background: studio walls are never flat.
    ramp = np.linspace(0, 1, size)[:, None, None]
    bg = (np.array(bg_a) * (1 - ramp) + np.array(bg_b) * ramp).repeat(size, axis=1)
    if rng.random() < 0.5:  # fabric or paper grain, so the background is not a clean cue
        bg = bg + rng.normal(0, float(rng.uniform(3, 12)), bg.shape)
    photo = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")

    scale = float(rng.uniform(0.75, 1.0))
    side = max(8, int(size * scale))
    garment = _garment(spec, side).rotate(float(rng.uniform(-12, 12)),
                                          resample=Image.Resampling.BICUBIC, expand=False)
    slack = size - side
    dx = int(rng.integers(0, slack + 1)) if slack > 0 else 0
    dy = int(rng.integers(0, slack + 1)) if slack > 0 else 0
    photo.paste(garment, (dx, dy), garment)

    photo = ImageEnhance.Brightness(photo).enhance(float(rng.uniform(0.75, 1.25)))
    photo = ImageEnhance.Contrast(photo).enhance(float(rng.uniform(0.8, 1.2)))
    if rng.random() < 0.3:  # something in front of the garment: a hand, a bag, a sign
        w, h = (int(v) for v in rng.integers(size // 8, size // 3, 2))
        x, y = (int(v) for v in rng.integers(0, size - min(w, h), 2))
        ImageDraw.Draw(photo).rectangle(
            [x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return photo


def noisy_caption(text: str, rng: np.random.Generator, empty_rate: float) -> str:
    """``text`` as a scraper would bring it back."""
    if rng.random() < empty_rate:
        return "" if rng.random() < 0.7 else "   "
    words = text.split()
    if rng.random() < 0.4:  # a stuttering template repeats a word
        i = int(rng.integers(len(words)))
        words.insert(i, words[i])
    casing = rng.integers(3)
    if casing == 0:
        words = [w.upper() for w in words]
    elif casing == 1:
        words = [w.capitalize() for w in words]
    out = ""
    for w in words:
        out += w + (" " * int(rng.integers(1, 4)) if rng.random() < 0.2 else " ")
    if rng.random() < 0.4:
        tag = _HTML[rng.integers(len(_HTML))]
        out = f"{tag}{out}" if rng.random() < 0.5 else f"{out}{tag}"
    if rng.random() < 0.3:
        out += " " + _FILLER[rng.integers(len(_FILLER))].upper() + "!!"
    if rng.random() < 0.3:
        out += " " + _EMOJI[rng.integers(len(_EMOJI))]
    if rng.random() < 0.2:
        out = "\t " + out + " \n"
    return out


def _draw_job(job: tuple[dict[str, Any], int, int, int, int, str]) -> None:
    spec, seed, item, view, size, path = job
    draw_view(spec, seed, item, view, size).save(path, optimize=False)


def generate(out_dir: Path, params: SyntheticParams, seed: int, workers: int = 0) -> Path:
    """Draw the data set into ``out_dir``; returns its ``manifest.csv``.

    Columns: ``image,item_id,split,camera,caption,attributes``. Test identities' first
    ``query_views`` views are queries, the rest gallery; ``camera`` is the view index.
    """
    if params.query_views >= params.views:
        raise ConfigError(f"data.synthetic.query_views ({params.query_views}) must be below "
                          f"data.synthetic.views ({params.views}): a test item needs a gallery "
                          "image")
    n_test = min(params.items - 2, max(2, round(params.items * params.test_fraction)))
    if params.items - n_test < 2:
        raise ConfigError(f"data.synthetic.items ({params.items}) leaves fewer than 2 training "
                          "identities")
    out_dir = Path(out_dir)
    images, manifest = out_dir / "images", out_dir / "manifest.csv"
    # Always redraw: nothing stale from an earlier, bigger data set, and no old manifest left
    # pointing at half-drawn images if this run fails.
    manifest.unlink(missing_ok=True)
    if images.exists():
        shutil.rmtree(images)
    images.mkdir(parents=True)

    order = np.random.default_rng([seed, 1 << 20]).permutation(params.items)
    test_items = {int(i) for i in order[:n_test]}
    rows, jobs = [], []
    for item in range(params.items):
        spec = item_spec(seed, item)
        attributes = describe(spec)
        caption_rng = np.random.default_rng([seed, item, 1 << 21])
        for view in range(params.views):
            name = f"images/{item:05d}_{view}.png"
            if item in test_items:
                split = "query" if view < params.query_views else "gallery"
            else:
                split = "train"
            rows.append({"image": name, "item_id": f"item_{item:05d}", "split": split,
                         "camera": view,
                         "caption": noisy_caption(attributes, caption_rng,
                                                  params.empty_caption_rate),
                         "attributes": attributes})
            jobs.append((spec, seed, item, view, params.image_size, str(out_dir / name)))

    if workers > 0:
        with Pool(workers) as pool:
            pool.map(_draw_job, jobs, chunksize=16)
    else:
        for job in jobs:
            _draw_job(job)

    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # A stamp of what was drawn, for a person looking at the folder; generate never trusts it.
    (out_dir / "synthetic.json").write_text(
        json.dumps({"seed": seed, **dataclasses.asdict(params), "test_items": n_test},
                   indent=1, sort_keys=True),
        encoding="utf-8")
    return manifest
