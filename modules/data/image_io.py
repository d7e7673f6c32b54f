"""Image files in and out: which files are images, decoding (with the decompression-bomb guard),
masks, and writing PNGs and grids. Every reader of the project (training data, ``sample.py
--masks``, FID folders) goes through here, so they accept the same files and read them alike.

Pixel conventions: decoded images are RGB; transparent images are composited on white; 16-bit
images are scaled (65535 -> 255), not clipped; EXIF orientation is applied. Masks are mode L
with values {0, 255}. Tensors given to the writers are in [-1, 1].
"""
from __future__ import annotations

import io
import logging
import math
import os
import random
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from modules import durable

logger = logging.getLogger(__name__)

# Largest accepted image, in pixels (16384 x 8192: ~400 MB decoded as RGB). Larger files are
# treated as decompression bombs: skipped and logged. PIL's own limit is raised to match so
# that it does not refuse legitimate images below ours (it errors above twice its limit).
MAX_IMAGE_PIXELS = 16384 * 8192
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = frozenset({
    ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".qoi",
})
MASKS_FOLDER = "masks"      # the masks of an image folder (paired by path or stem); never scanned as images
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

PathLike = Union[str, os.PathLike]
Source = Union[PathLike, io.BytesIO]


class UnreadableImage(Exception):
    """One image (or mask) cannot be decoded; the item is skipped or substituted."""


# ----------------------------------------------------------------------------- which files

def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def find_images(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder``, sorted; hidden files and folders are left out, and so are the
    folders this toolkit writes its outputs into (runs, samples, sweeps: ``modules.durable.OUTPUT_MARKER``),
    so an output folder inside a data folder never becomes training data, and folders named
    :data:`MASKS_FOLDER` below ``folder`` (at any depth): they hold masks, never images. Both are logged.

    Folder links are followed (a class folder may be a link to elsewhere), each real folder
    once, so a link loop ends; links to nothing are left out.
    """
    if not recursive:
        return sorted(p for p in folder.iterdir() if is_image_file(p) and p.is_file())
    files, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        if dirpath != str(folder) and durable.is_output_folder(dirpath):
            logger.info("skipping %s: it holds this toolkit's output, not data", dirpath)
            dirnames[:] = []
            continue
        for name in dirnames:
            if name == MASKS_FOLDER:
                logger.info("skipping %s: a %s/ folder holds masks, not images", os.path.join(dirpath, name),
                            MASKS_FOLDER)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != MASKS_FOLDER)
        files.extend(p for p in (Path(dirpath) / f for f in sorted(filenames)) if is_image_file(p) and p.is_file())
    return files


# ----------------------------------------------------------------------------- decoding

def open_image(source: Source) -> Image.Image:
    """Open (header only) and refuse images above :data:`MAX_IMAGE_PIXELS`."""
    img = Image.open(source)
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise UnreadableImage(f"{width}x{height} pixels exceeds the decompression-bomb limit "
                              f"of {MAX_IMAGE_PIXELS} pixels")
    return img


def probe_image(source: Source) -> Optional[str]:
    """Why an image file cannot be used, from its header alone; None when it looks fine."""
    try:
        if isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
            return "empty file"
        with open_image(source):
            return None
    except UnreadableImage as e:
        return str(e)
    except Image.DecompressionBombError as e:
        return f"decompression bomb: {e}"
    except Exception as e:  # PIL plugins raise many exception types on corrupt data
        return f"not an image ({type(e).__name__}: {e})"


def _to_8bit_gray(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float single-channel images to 8-bit L, scaled, not clipped."""
    arr = np.asarray(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        scaled = arr.astype(np.float64) / 257.0
    elif img.mode == "I":
        # 32-bit containers usually hold 16-bit data (TIFF, some PNG decoders); values that fit
        # in 8 bits are taken as 8-bit data.
        arr = np.clip(arr, 0, 65535).astype(np.float64)
        scaled = arr / 257.0 if arr.max(initial=0) > 255 else arr
    else:  # "F": [0, 1] floats when they fit, otherwise [0, 255]
        arr = np.nan_to_num(arr.astype(np.float64))
        scaled = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white."""
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        img = _to_8bit_gray(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        if img.mode == "La":    # premultiplied L + alpha: PIL converts it only via LA
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _draft_for(img: Image.Image, min_short_side: float) -> None:
    """Let JPEG decode at a reduced scale when the image is much larger than needed."""
    if img.format != "JPEG":
        return
    width, height = img.size
    short = min(width, height)
    if short <= 2 * min_short_side:
        return
    factor = min_short_side / short
    img.draft(img.mode, (max(1, math.ceil(width * factor)), max(1, math.ceil(height * factor))))


def load_rgb(source: Source, min_short_side: float = 0) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, RGB; raises :class:`UnreadableImage`."""
    try:
        with open_image(source) as img:
            if min_short_side:
                _draft_for(img, min_short_side)
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except UnreadableImage:
        raise
    except Exception as e:  # PIL plugins raise many exception types on corrupt data
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None


_warned_masks: set[str] = set()


def load_mask(source: Source, name: str) -> Image.Image:
    """Decode a mask to mode L with values {0, 255}.

    Masks stored as {0, 1} are taken as they are; other values are thresholded at 128 with
    one warning per file. Raises :class:`UnreadableImage`.
    """
    try:
        with open_image(source) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
                img = _to_8bit_gray(img)
            values = np.asarray(img.convert("L"))
    except UnreadableImage:
        raise
    except Exception as e:  # PIL plugins raise many exception types on corrupt data
        raise UnreadableImage(f"{type(e).__name__}: {e}") from None
    if values.max(initial=0) <= 1:
        binary = values > 0
    else:
        binary = values >= 128
        if name not in _warned_masks and not np.isin(values, (0, 255)).all():
            _warned_masks.add(name)
            logger.warning("mask %s is not binary (values other than 0 and 255); thresholded at 128", name)
    return Image.fromarray(binary.astype(np.uint8) * 255, "L")


def crop_box(width: int, height: int, rng: Optional[random.Random],
             crop_scale: float) -> tuple[float, float, float, float]:
    """Square crop: centred and maximal, or (with rng) of area fraction in [crop_scale, 1]
    of the maximal square, anywhere in the image."""
    short = min(width, height)
    if rng is None:
        left, top, side = (width - short) / 2, (height - short) / 2, short
    else:
        side = short * math.sqrt(rng.uniform(crop_scale, 1.0))
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    return (left, top, left + side, top + side)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 ``[C, H, W]``."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def square_pixels(image: Image.Image, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """The square ``box`` of a decoded image resized to ``size`` (bicubic): uint8 ``[3, size, size]``."""
    return to_tensor(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def square_image(source: Source, size: int) -> torch.Tensor:
    """An image as the image data set gives it without augmentation: the centred maximal square, resized to
    ``size``; float32 ``[3, size, size]`` in [-1, 1]. Raises :class:`UnreadableImage`."""
    image = load_rgb(source, min_short_side=size)
    return square_pixels(image, crop_box(image.width, image.height, None, 1.0), size).float() / 127.5 - 1.0


def image_tensor(source: Source) -> torch.Tensor:
    """An image file as RGB float32 ``[3, H, W]`` in [-1, 1], at its own size."""
    return to_tensor(load_rgb(source)).float() / 127.5 - 1.0


def mask_tensor(source: Source, size: int) -> torch.Tensor:
    """A mask file as training sees it without augmentation: centre square, nearest resize, {0, 1} [1,S,S]."""
    img = load_mask(source, str(source))
    box = crop_box(img.width, img.height, None, 1.0)
    return (to_tensor(img.resize((size, size), Image.Resampling.NEAREST, box=box)) > 127).float()


# ----------------------------------------------------------------------------- writing

def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` in [-1, 1] to uint8 ``[..., H, W, 3]`` (rounded, clipped)."""
    array = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).byte()
    return array.movedim(-3, -1).numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG atomically: a crash or a full disk never leaves a partial file under ``path``."""
    durable.write_file(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stack rows of images ([N,3,H,W] each, same N) into one [3, H', W'] grid in [-1, 1]."""
    n, c, h, w = rows[0].shape
    grid = torch.full((c, len(rows) * (h + pad) + pad, n * (w + pad) + pad), -1.0)
    for r, row in enumerate(rows):
        for i in range(n):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[:, top:top + h, left:left + w] = row[i].detach().float().cpu()
    return grid


def tile(images: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` as a near-square grid (ceil(sqrt N) per row, the last row padded)."""
    per_row = math.ceil(math.sqrt(images.shape[0]))
    rows = [images[i:i + per_row] for i in range(0, images.shape[0], per_row)]
    if len(rows[-1]) < per_row:
        pad = torch.full((per_row - len(rows[-1]), *images.shape[1:]), -1.0)
        rows[-1] = torch.cat([rows[-1].float().cpu(), pad])
    return make_grid(rows)
