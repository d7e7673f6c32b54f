"""Synthetic "shapes" data: coloured circles, squares and triangles on textured backgrounds.

Each image holds one shape (its class) at a random position, size and rotation over a
background of smooth noise or stripes, with its exact binary foreground mask. Shapes are
strongly saturated colours and backgrounds are low-saturation tints, so the foreground of a
clean image is recovered by :func:`foreground_mask` (saturation threshold); this is how the
mask fidelity of generated images is measured (with ``modules.metrics.mask_iou``). One folder
written by :func:`make_shapes` serves unconditional, class-conditional and mask-conditional training.

Image i of a seed is the same whatever the number of images requested.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle")      # sorted: folder order gives these labels
LAYOUTS = ("imagefolder", "flat")
BACKGROUNDS = ("textured", "plain")             # plain: one light grey, the quickstart's easier set
PLAIN_GREY = 0.85
BACKGROUND_MAX_SATURATION = 0.2
SHAPE_MIN_SATURATION = 0.85
FOREGROUND_SATURATION = 0.5                     # threshold halfway between the two
COLOURS = ("red", "yellow", "green", "cyan", "blue", "magenta")   # hue names, 60 degrees apart from red
BACKGROUND_WORDS = ("cloudy", "striped", "plain")


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - math.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """Float RGB in [0, 1]: a low-saturation tint whose brightness is textured; and the texture's word."""
    tint = _hsv_to_rgb(rng.random(), rng.uniform(0, BACKGROUND_MAX_SATURATION), rng.uniform(0.3, 0.7))
    cloudy = rng.random() < 0.5
    if cloudy:
        cells = int(rng.integers(3, 7))
        coarse = rng.normal(0.0, 0.15, size=(cells, cells)).astype(np.float32)
        texture = np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.Resampling.BICUBIC))
    else:
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        angle, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
        phase = rng.uniform(0, 2 * math.pi)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) / size + phase)
        texture = rng.uniform(0.1, 0.25) * wave
    brightness = np.clip(1.0 + texture, 0.6, 1.4)
    # scaling all channels by the same factor keeps the tint's saturation
    return np.clip(tint[None, None, :] * brightness[:, :, None], 0.0, 1.0), "cloudy" if cloudy else "striped"


def _shape_mask(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """Exact pixel-centre coverage of one shape, fully inside the image."""
    radius = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(radius, size - radius, size=2)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    dx, dy = xx - cx, yy - cy
    if SHAPES[label] == "circle":
        return dx * dx + dy * dy <= radius * radius
    if SHAPES[label] == "square":
        half = radius / math.sqrt(2)            # corners on the circle of the given radius
        u = dx * math.cos(theta) + dy * math.sin(theta)
        v = -dx * math.sin(theta) + dy * math.cos(theta)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    inside = np.ones((size, size), dtype=bool)  # equilateral triangle: inradius = radius / 2
    for k in range(3):
        normal = theta + math.pi / 3 + 2 * math.pi * k / 3
        inside &= dx * math.cos(normal) + dy * math.sin(normal) <= radius / 2
    return inside


def colour_name(hue: float) -> str:
    """The word of a hue in [0, 1): the nearest of six names, 60 degrees apart."""
    return COLOURS[int(round(hue * len(COLOURS))) % len(COLOURS)]


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def caption_words(text: str) -> tuple[str, str]:
    """(colour, shape) of a caption made by :func:`caption`."""
    words = text.split()
    return words[1], words[2]


def render_shape(rng: np.random.Generator, image_size: int, label: int,
                 background: str = "textured") -> tuple[np.ndarray, np.ndarray, str]:
    """One image (uint8 [S, S, 3]), its foreground mask (bool [S, S]) and its caption, for class ``label``."""
    if not 0 <= label < len(SHAPES):
        raise ValueError(f"label {label} is not a shape class (0..{len(SHAPES) - 1}: {', '.join(SHAPES)})")
    image, texture = _background(rng, image_size)   # drawn either way, so both backgrounds get the same shapes
    if background == "plain":
        image, texture = np.full_like(image, PLAIN_GREY), "plain"
    mask = _shape_mask(rng, image_size, label)
    hue = rng.random()
    colour = _hsv_to_rgb(hue, rng.uniform(SHAPE_MIN_SATURATION, 1.0), rng.uniform(0.8, 1.0))
    # a soft light gradient changes brightness only, so the colour stays saturated
    yy, xx = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.clip(0.5 + 0.35 * (np.cos(angle) * (2 * xx - 1) + np.sin(angle) * (2 * yy - 1)), 0, 1)
    shading = 0.85 + 0.15 * ramp
    image[mask] = colour[None, :] * shading[mask][:, None]
    return np.round(image * 255).astype(np.uint8), mask, caption(colour_name(hue), SHAPES[label], texture)


def render_shape_batch(num_images: int, image_size: int = 64, seed: int = 0, labels: Optional[Sequence[int]] = None,
                       background: str = "textured") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images uint8 [N, S, S, 3], masks bool [N, S, S], labels int64 [N], without files.

    Labels cycle through the classes unless given. Image i depends only on (seed, i, label).
    The captions are :func:`shape_captions`.
    """
    return _render_batch(num_images, image_size, seed, labels, background)[:3]


def shape_captions(num_images: int, image_size: int = 64, seed: int = 0, labels: Optional[Sequence[int]] = None,
                   background: str = "textured") -> list[str]:
    """The captions of :func:`render_shape_batch`'s images ("a red square on a striped background")."""
    return _render_batch(num_images, image_size, seed, labels, background)[3]


def _render_batch(num_images: int, image_size: int, seed: int, labels: Optional[Sequence[int]],
                  background: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    labels = np.asarray([i % len(SHAPES) for i in range(num_images)] if labels is None else labels,
                        dtype=np.int64)
    if len(labels) != num_images:
        raise ValueError(f"got {len(labels)} labels for {num_images} images")
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    masks = np.empty((num_images, image_size, image_size), dtype=bool)
    captions = []
    for i, label in enumerate(labels):
        images[i], masks[i], text = render_shape(np.random.default_rng([seed, i]), image_size, int(label), background)
        captions.append(text)
    return images, masks, labels, captions


def foreground_mask(image_uint8: np.ndarray) -> np.ndarray:
    """Shape pixels of a shapes image (uint8 [..., H, W, 3]) as a bool array [..., H, W]."""
    rgb = np.asarray(image_uint8, dtype=np.float32)
    if rgb.shape[-1] != 3:
        raise ValueError(f"expected RGB images with a last axis of 3, got shape {rgb.shape}")
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (high - low) / np.maximum(high, 1.0)
    return (saturation >= FOREGROUND_SATURATION) & (high >= 32)


def make_shapes(out_dir: str | Path, num_images: int, image_size: int = 64, seed: int = 0,
                layout: str = "imagefolder", background: str = "textured") -> Path:
    """Write a shapes data set as PNG files; returns the folder.

    ``imagefolder``: ``<class>/<i>.png``, masks in ``masks/<class>/<i>.png`` and a
    ``metadata.jsonl`` (file_name, mask_file_name, label, text: the caption). ``flat``: ``<i>.png`` with masks in
    ``masks/<i>.png`` paired by name, no labels. The folder must be empty or absent.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r} is not one of {', '.join(BACKGROUNDS)}")
    if num_images < 1 or image_size < 1:
        raise ValueError(f"need num_images >= 1 and image_size >= 1, got {num_images}, {image_size}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; choose a new folder")
    images, masks, labels, captions = _render_batch(num_images, image_size, seed, None, background)
    rows = []
    for i, (image, mask, label, text) in enumerate(zip(images, masks, labels, captions)):
        sub = f"{SHAPES[label]}/" if layout == "imagefolder" else ""
        file_name, mask_name = f"{sub}{i:05d}.png", f"masks/{sub}{i:05d}.png"
        for rel, array in ((file_name, image), (mask_name, mask.astype(np.uint8) * 255)):
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(out / rel)
        rows.append({"file_name": file_name, "mask_file_name": mask_name, "label": int(label), "text": text})
    if layout == "imagefolder":
        with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return out


# ----------------------------------------------------------------------------- reading a caption back

# Shapes are told apart by the distance from the centroid to the outline as a function of the angle:
# flat for a circle, with four bumps for a square and three for a triangle. The 3rd and 4th Fourier
# harmonics of that profile, over its mean, are at most 0.020 for clean 32 px circles (512 images)
# and at least 0.048 (square, 4th) or 0.109 (triangle, 3rd) for the others; a small VAE's soft edges
# halve them, so the circle threshold sits low.
_PROFILE_BINS = 24
_CIRCLE_BELOW = 0.025


def _window_sum(mask: np.ndarray) -> np.ndarray:
    """How many pixels of each 3x3 neighbourhood are set (outside the image counts as unset)."""
    padded = np.pad(mask.astype(np.int32), 1)
    h, w = mask.shape
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))


def _main_part(mask: np.ndarray) -> np.ndarray:
    """The 8-connected part of ``mask`` around its densest pixel: a generated image's stray specks
    are not part of its shape."""
    region = np.zeros_like(mask)
    region[np.unravel_index(np.argmax(_window_sum(mask)), mask.shape)] = True
    while True:
        grown = (_window_sum(region) > 0) & mask
        if np.array_equal(grown, region):
            return region
        region = grown


def shape_of(mask: np.ndarray) -> Optional[str]:
    """The shape word of a foreground mask (bool [H, W]) from the harmonics of its outline's radial profile;
    None for a mask too small to have an outline."""
    part = _main_part(np.asarray(mask, dtype=bool)) if np.any(mask) else None
    if part is None or part.sum() < 3:
        return None
    ys, xs = np.nonzero(part)
    cy, cx = ys.mean(), xs.mean()
    outline = part & (_window_sum(part) < 9)             # pixels with a neighbour outside the shape
    by, bx = np.nonzero(outline)
    angle_bin = ((np.arctan2(by - cy, bx - cx) / (2 * math.pi) + 0.5) * _PROFILE_BINS).astype(int) % _PROFILE_BINS
    profile = np.full(_PROFILE_BINS, np.nan)
    np.fmax.at(profile, angle_bin, np.hypot(by - cy, bx - cx) + 0.5)
    seen = ~np.isnan(profile)
    if seen.sum() < _PROFILE_BINS // 2:
        return None
    bins = np.arange(_PROFILE_BINS)
    spectrum = np.abs(np.fft.rfft(np.interp(bins, bins[seen], profile[seen], period=_PROFILE_BINS)))
    third, fourth = spectrum[3] / spectrum[0], spectrum[4] / spectrum[0]
    if max(third, fourth) < _CIRCLE_BELOW:
        return "circle"
    return "triangle" if third > fourth else "square"


def colour_of(image_uint8: np.ndarray, mask: np.ndarray) -> Optional[str]:
    """The colour word of the mean colour of ``image``'s pixels under ``mask``; None for an empty mask."""
    if not np.any(mask):
        return None
    r, g, b = np.asarray(image_uint8, dtype=np.float64)[np.asarray(mask, dtype=bool)].mean(axis=0) / 255.0
    high, low = max(r, g, b), min(r, g, b)
    if high == low:
        return None
    if high == r:
        hue = ((g - b) / (high - low)) % 6
    elif high == g:
        hue = (b - r) / (high - low) + 2
    else:
        hue = (r - g) / (high - low) + 4
    return colour_name(hue / 6)


def read_caption(image_uint8: np.ndarray) -> tuple[Optional[str], Optional[str]]:
    """(colour, shape) words read back from a shapes image through :func:`foreground_mask`."""
    mask = foreground_mask(image_uint8)
    return colour_of(image_uint8, mask), shape_of(mask)
