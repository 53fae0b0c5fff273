"""The built-in default data set: a SYNTHETIC ImageNet-style folder of JPEGs, generated from a seed.

For `make reproduce` and the tests on a machine with no data. It is not real data and is never
presented as such: ROOT/SYNTHETIC.txt says what it is and how it was made.

Design. Class k is a (colour, shape) pair; colours and shapes are arranged in a cycle so that every
colour belongs to two classes and every shape to two classes (red_disc, red_square, green_square,
green_triangle, blue_triangle, blue_hstripes, yellow_hstripes, yellow_vstripes, purple_vstripes,
purple_disc for 10 classes): colour alone or shape alone gives at most 50% accuracy, both are needed,
and hstripes vs vstripes needs oriented features. Horizontal mirroring keeps every label (no class
depends on left/right). Nuisances: image size and aspect ratio (180..520 px a side, many below 256,
so preparation upscales some), object position and scale, small rotations, hue/saturation/value
jitter, a low-saturation gradient background with noise, desaturated clutter (lines, outlines,
blobs) behind and over the object, global brightness/contrast, JPEG quality 75..95. The object
always lies in the central square of the image, the part §2's centre crop keeps.

Determinism: image i of class c of split s is drawn from numpy's PCG64 seeded with
(seed, s, c, i), independently of every other image and of the number of worker processes; the same
seed gives byte-identical files (same Pillow/libjpeg).
"""
from __future__ import annotations

import colorsys
import json
import logging
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .config import DataError

log = logging.getLogger(__name__)

SYNTH_VERSION = 1
MARKER = "SYNTHETIC.txt"
_PARTIAL = ".synthetic-incomplete"
# (name, hue in degrees); the first five are far apart on the hue circle.
COLOURS = (("red", 0), ("green", 120), ("blue", 225), ("yellow", 55), ("purple", 285), ("orange", 28),
           ("cyan", 185), ("pink", 330))
SHAPES = ("disc", "square", "triangle", "hstripes", "vstripes", "ring", "cross", "checker")
SHAPE_TEXT = {
    "disc": "a filled disc (ellipse, axis ratio up to 1.35)",
    "square": "a filled square, rotated up to 20 degrees",
    "triangle": "a filled upward triangle, rotated up to 20 degrees",
    "hstripes": "a rectangle of horizontal stripes (colour / dark colour), tilted up to 12 degrees",
    "vstripes": "a rectangle of vertical stripes (colour / dark colour), tilted up to 12 degrees",
    "ring": "an annulus",
    "cross": "a plus-shaped cross, rotated up to 20 degrees",
    "checker": "a rectangle of checks (colour / dark colour), tilted up to 12 degrees",
}
DEFAULTS = {"classes": 10, "train_per_class": 130, "val_per_class": 30}


def class_specs(classes: int) -> list:
    """[(name, hue, shape)] for `classes` classes: colour k pairs with shapes k and k+1 (cyclic)."""
    n = max(2, math.ceil(classes / 2))
    if not 2 <= classes <= 2 * len(COLOURS):
        raise DataError(f"classes: the synthetic set has 2..{2 * len(COLOURS)} classes, got {classes}")
    specs = []
    for k in range(n):
        for shape in (SHAPES[k], SHAPES[(k + 1) % n]):
            name, hue = COLOURS[k]
            specs.append((f"{name}_{shape}", hue, shape))
    return specs[:classes]


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _dull(rng) -> tuple:
    """A low-saturation colour for clutter: never mistaken for a class colour."""
    return tuple(int(c) for c in _rgb(rng.uniform(), rng.uniform(0, 0.22), rng.uniform(0.1, 0.95)))


def _clutter(draw: ImageDraw.ImageDraw, rng, w: int, h: int, n: int, kinds: int) -> None:
    """n items among the first `kinds` of: line, ellipse outline, filled rectangle; dull colours."""
    for _ in range(n):
        kind = rng.integers(kinds)
        x0, y0 = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 1.1) * h
        ext = rng.uniform(0.04, 0.3) * min(w, h)
        x1, y1 = x0 + rng.uniform(-1, 1) * ext * 2, y0 + rng.uniform(-1, 1) * ext * 2
        box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        if kind == 0:
            draw.line((x0, y0, x1, y1), fill=_dull(rng), width=int(rng.integers(1, 5)))
        elif kind == 1:
            draw.ellipse(box, outline=_dull(rng), width=int(rng.integers(1, 4)))
        else:
            draw.rectangle(box, fill=_dull(rng))


def _object_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float, rng) -> tuple:
    """(inside, dark) boolean masks in the object's rotated frame (u right, v down, radius r)."""
    dark = None
    if shape == "disc":
        a, b = r * rng.uniform(0.85, 1.15), r * rng.uniform(0.85, 1.15)
        inside = (u / a) ** 2 + (v / b) ** 2 <= 1
    elif shape == "ring":
        rr = (u / r) ** 2 + (v / r) ** 2
        inside = (rr <= 1) & (rr >= rng.uniform(0.25, 0.45))
    elif shape == "square":
        inside = (np.abs(u) <= 0.85 * r) & (np.abs(v) <= 0.85 * r)
    elif shape == "triangle":
        t = (v + r) / (1.75 * r)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(u) <= 0.95 * r * t)
    elif shape == "cross":
        arm = r * rng.uniform(0.25, 0.35)
        inside = ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))
    else:  # textured rectangles: stripes across v (horizontal), across u (vertical), or checks
        a, b = r * rng.uniform(0.8, 1.0), r * rng.uniform(0.8, 1.0)
        inside = (np.abs(u) <= a) & (np.abs(v) <= b)
        period = r * rng.uniform(0.32, 0.5)
        phase = rng.uniform(0, period)
        band_v = np.floor((v + phase) / (period / 2)).astype(np.int64) % 2 == 1
        band_u = np.floor((u + phase) / (period / 2)).astype(np.int64) % 2 == 1
        dark = {"hstripes": band_v, "vstripes": band_u, "checker": band_u ^ band_v}[shape]
    return inside, dark


def render(rng: np.random.Generator, hue: float, shape: str) -> Image.Image:
    """One synthetic image of class (hue, shape); all randomness from `rng`."""
    w = int(rng.integers(180, 521))
    h = int(np.clip(round(w / math.exp(rng.uniform(math.log(0.6), math.log(1.7)))), 180, 520))
    gain, offset = np.float32(rng.uniform(0.85, 1.15)), np.float32(rng.uniform(-15, 15))

    def tone(c):  # global contrast and brightness, applied to every colour drawn below
        return (c - 128) * gain + 128 + offset

    # Background: a gradient between two low-saturation colours, plus pixel noise.
    c0 = tone(_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.15, 0.9)))
    c1 = tone(_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.15, 0.9)))
    ang = rng.uniform(0, 2 * math.pi)
    t = (np.arange(w, dtype=np.float32) * np.float32(math.cos(ang))
         + np.arange(h, dtype=np.float32)[:, None] * np.float32(math.sin(ang)))
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(rng.uniform(2, 10) * gain)
    arr = np.empty((h, w, 3), dtype=np.uint8)
    for ch in range(3):  # channel by channel: numpy broadcasting over a last axis of 3 is slow
        arr[..., ch] = np.clip(c0[ch] + (c1[ch] - c0[ch]) * t + noise, 0, 255)
    pil = Image.fromarray(arr)
    _clutter(ImageDraw.Draw(pil), rng, w, h, int(rng.integers(3, 9)), kinds=3)
    arr = np.array(pil)

    # The object: inside the central square (what the centre 256 crop keeps), radius 16..30% of it.
    m = min(w, h)
    r = rng.uniform(0.16, 0.30) * m
    cx = rng.uniform((w - m) / 2 + 0.8 * r, (w + m) / 2 - 0.8 * r)
    cy = rng.uniform((h - m) / 2 + 0.8 * r, (h + m) / 2 - 0.8 * r)
    tilt = 12 if shape in ("hstripes", "vstripes", "checker") else 20
    th = math.radians(rng.uniform(-tilt, tilt))
    x0, x1 = max(0, int(cx - 1.5 * r)), min(w, int(cx + 1.5 * r) + 1)
    y0, y1 = max(0, int(cy - 1.5 * r)), min(h, int(cy + 1.5 * r) + 1)
    dx = np.arange(x0, x1, dtype=np.float32) - np.float32(cx)
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    u, v = dx * math.cos(th) + dy * math.sin(th), -dx * math.sin(th) + dy * math.cos(th)
    inside, dark = _object_mask(shape, u, v, r, rng)
    colour = _rgb((hue + rng.uniform(-10, 10)) / 360.0, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0))
    patch = arr[y0:y1, x0:x1].astype(np.float32)
    patch[inside] = tone(colour)
    if dark is not None:
        patch[inside & dark] = tone(colour * np.float32(rng.uniform(0.2, 0.4)))
    patch[inside] += rng.standard_normal((int(inside.sum()), 1), dtype=np.float32) * 4
    arr[y0:y1, x0:x1] = np.clip(patch, 0, 255).astype(np.uint8)

    # A few thin lines over the object: partial occlusion, never enough to hide it.
    pil = Image.fromarray(arr)
    _clutter(ImageDraw.Draw(pil), rng, w, h, int(rng.integers(0, 3)), kinds=1)
    return pil


def _params(seed, classes, train_per_class, val_per_class) -> dict:
    return {"generator": f"splitnet.data.synth v{SYNTH_VERSION}", "seed": seed, "classes": classes,
            "train_per_class": train_per_class, "val_per_class": val_per_class}


def _jobs(root: Path, seed: int, specs: list, counts: dict) -> list:
    jobs = []
    for s, split in enumerate(("train", "val")):
        for c, (name, hue, shape) in enumerate(specs):
            for i in range(counts[split]):
                path = root / split / name / f"{name}_{split}_{i:05d}.JPEG"
                jobs.append((str(path), (seed, s, c, i), hue, shape))
    return jobs


def _make_one(job) -> None:
    path, key, hue, shape = job
    rng = np.random.default_rng(list(key))
    img = render(rng, hue, shape)
    quality = int(rng.integers(75, 96))
    tmp = f"{path}.tmp"
    img.save(tmp, "JPEG", quality=quality)
    os.replace(tmp, path)


def make_synthetic(root, seed: int = 0, classes: int = DEFAULTS["classes"],
                   train_per_class: int = DEFAULTS["train_per_class"], val_per_class: int = DEFAULTS["val_per_class"],
                   workers: int = 0) -> Path:
    """Write the synthetic set to ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG; returns ROOT.

    Deterministic from `seed` (any `workers`; 0 = every core). A folder already holding the same set
    (same SYNTHETIC.txt parameters) is left as it is; a non-empty folder holding anything else is an
    error; an interrupted generation is simply redone.
    """
    root = Path(root)
    if seed < 0:
        raise DataError(f"seed: must be >= 0, got {seed}")
    if train_per_class < 1 or val_per_class < 0:
        raise DataError(f"train_per_class must be >= 1 and val_per_class >= 0, got {train_per_class}, {val_per_class}")
    specs = class_specs(classes)
    params = _params(seed, classes, train_per_class, val_per_class)
    marker = root / MARKER
    if marker.is_file():
        first = marker.read_text().splitlines()[0] if marker.stat().st_size else ""
        if first == json.dumps(params):
            log.info("synth: %s already holds this synthetic set", root)
            return root
        raise DataError(f"{marker}: {root} holds a synthetic set with other parameters ({first}); "
                        f"remove it or choose another folder")
    if root.exists() and any(root.iterdir()) and not (root / _PARTIAL).exists():
        raise DataError(f"{root}: not empty; the synthetic set needs a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    (root / _PARTIAL).touch()
    counts = {"train": train_per_class, "val": val_per_class}
    for split in counts:
        for name, _, _ in specs:
            if counts[split]:
                (root / split / name).mkdir(parents=True, exist_ok=True)
    jobs = _jobs(root, seed, specs, counts)
    t0 = time.monotonic()
    n = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    if n <= 1:
        for j in jobs:
            _make_one(j)
    else:
        with multiprocessing.get_context().Pool(n) as pool:
            for _ in pool.imap_unordered(_make_one, jobs, chunksize=16):
                pass
    marker.write_text(_describe(params, specs, counts))
    (root / _PARTIAL).unlink()
    log.info("synth: %d images in %d classes written to %s in %.1f s", len(jobs), len(specs), root,
             time.monotonic() - t0)
    return root


def _describe(params: dict, specs: list, counts: dict) -> str:
    lines = [json.dumps(params), "",
             "SYNTHETIC DATA. Every image in this folder was drawn by a program",
             f"({params['generator']}, part of splitnet) from the seed above; none is a photograph.",
             "It exists so splitnet can be built, tested and run end to end on a machine with no data.",
             "Accuracy on it says nothing about ImageNet.", "",
             f"Layout: ImageNet-style, train/<class>/*.JPEG ({counts['train']} per class) and "
             f"val/<class>/*.JPEG ({counts['val']} per class).",
             "Each class is a colour and a shape; every colour is shared by two classes and every shape",
             "by two classes, so both colour and shape/orientation are needed. Nuisances: image size and",
             "aspect ratio (180..520 px a side), position, scale, small rotations, colour jitter, a",
             "gradient background with noise, desaturated clutter, brightness/contrast, JPEG quality.", "",
             "Classes:"]
    for name, hue, shape in specs:
        lines.append(f"  {name}: {SHAPE_TEXT[shape]}; hue {hue} +/- 10 degrees, saturation and value 0.6..1")
    return "\n".join(lines) + "\n"
