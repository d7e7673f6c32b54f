"""Image data sets for both training stages, and the resumable order in which they are read.

Sources (:func:`build_dataset`): a local folder in HuggingFace ``imagefolder`` layout, a
folder written by ``datasets``' ``save_to_disk``, or a hub dataset name. Images are decoded
lazily in ``__getitem__``. A cheap header scan at build time (local folders only) drops files
that are empty, that PIL cannot identify, or that exceed :data:`MAX_IMAGE_PIXELS`; an image
that still fails while decoding (e.g. a truncated file) is replaced by the next readable
index, deterministically, and the item is flagged ``substituted``.

An item is addressed as ``index`` (never augmented) or ``(index, aug_seed)``: augmentation
parameters come from ``random.Random(aug_seed)``, so an item is a pure function of its key.
:class:`ResumableBatchSampler` derives those keys from (seed, epoch, position), so a run
resumed at micro-batch k sees exactly the batches an uninterrupted run would.

Pixel conventions: RGB float32 [3, S, S] in [-1, 1]; masks float32 [1, S, S] in {0, 1}.
Transparent images are composited on white. 16-bit images are scaled (65535 -> 255), not
clipped. EXIF orientation is applied. Augmentation (random resized square crop, flips,
rot90) is applied jointly to an image and its mask.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import os
import random
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from modules.config import DataConfig

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
MASKS_FOLDER = "masks"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_LOG_EACH_SKIPPED = 20      # skipped files logged one by one; the rest only counted

PathLike = Union[str, os.PathLike]
ItemKey = Union[int, tuple[int, int]]


class DataError(ValueError):
    """The data cannot be used for training; the message names the path or file."""


class UnreadableImage(Exception):
    """One image (or mask) cannot be decoded; the item is skipped or substituted."""


# ----------------------------------------------------------------------------- decoding

def open_image(source: Union[PathLike, io.BytesIO]) -> Image.Image:
    """Open (header only) and refuse images above :data:`MAX_IMAGE_PIXELS`."""
    img = Image.open(source)
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        img.close()
        raise UnreadableImage(f"{width}x{height} pixels exceeds the decompression-bomb limit "
                              f"of {MAX_IMAGE_PIXELS} pixels")
    return img


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


def load_rgb(source: Union[PathLike, io.BytesIO], min_short_side: float = 0) -> Image.Image:
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


def load_mask(source: Union[PathLike, io.BytesIO], name: str) -> Image.Image:
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
            logger.warning("mask %s is not binary (values other than 0 and 255); "
                           "thresholded at 128", name)
    return Image.fromarray(binary.astype(np.uint8) * 255, "L")


def mask_tensor(source: Union[PathLike, io.BytesIO], size: int) -> torch.Tensor:
    """A mask file as training sees it without augmentation: centre square, nearest resize, {0, 1} [1,S,S]."""
    img = load_mask(source, str(source))
    box = _crop_box(img.width, img.height, None, 1.0)
    return (_to_tensor(img.resize((size, size), Image.Resampling.NEAREST, box=box)) > 127).float()


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


# ----------------------------------------------------------------------------- records

def _probe(source: Union[PathLike, io.BytesIO]) -> Optional[str]:
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


class _FileRecords:
    """Images (and masks) as files of a local folder."""

    def __init__(self, images: list[str], masks: Optional[list[str]]):
        self.images = images
        self.masks = masks

    def name(self, row: int) -> str:
        return self.images[row]

    def image(self, row: int) -> str:
        return self.images[row]

    def mask(self, row: int) -> str:
        return self.masks[row]

    def mask_name(self, row: int) -> str:
        return self.masks[row]


class _ArrowRecords:
    """Rows of a ``datasets.Dataset`` whose image columns are read undecoded (bytes / path)."""

    def __init__(self, table: Any, image_column: str, mask_column: Optional[str], origin: str):
        self.table = table
        self.image_column = image_column
        self.mask_column = mask_column
        self.origin = origin

    def name(self, row: int) -> str:
        return f"{self.origin}[{row}]"

    def mask_name(self, row: int) -> str:
        return f"{self.origin}[{row}].{self.mask_column}"

    def _source(self, value: Any) -> Union[str, io.BytesIO]:
        if value is None:
            raise UnreadableImage("no image in this row")
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return value["path"]
        raise UnreadableImage("empty image entry")

    def image(self, row: int) -> Union[str, io.BytesIO]:
        return self._source(self.table[row][self.image_column])

    def mask(self, row: int) -> Union[str, io.BytesIO]:
        return self._source(self.table[row][self.mask_column])


@dataclass
class _Source:
    records: Union[_FileRecords, _ArrowRecords]
    rows: np.ndarray                # record rows that passed the scan
    labels: np.ndarray              # int64 per record row, -1 when unlabelled
    class_names: list[str]
    skipped_files: list[str]
    has_masks: bool
    description: str


# ----------------------------------------------------------------------------- data set

class ImageDataset(Dataset):
    """Lazily decoded images (and masks) with labels; see the module docstring for items."""

    def __init__(self, source: _Source, cfg: DataConfig):
        self._source = source
        self._rows = source.rows
        self.image_size = cfg.image_size
        self.random_crop_scale = cfg.random_crop_scale
        self.hflip, self.vflip, self.rot90 = cfg.hflip, cfg.vflip, cfg.rot90
        self.training = True
        self._logged_failures: set[int] = set()

    # -- facts
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_classes(self) -> int:
        return len(self._source.class_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._source.class_names)

    @property
    def has_masks(self) -> bool:
        return self._source.has_masks

    @property
    def skipped_at_scan(self) -> int:
        return len(self._source.skipped_files)

    @property
    def skipped_files(self) -> list[str]:
        return list(self._source.skipped_files)

    @property
    def labels(self) -> np.ndarray:
        """Label of every item (int64, -1 when unlabelled), without decoding images."""
        return self._source.labels[self._rows]

    @property
    def augments(self) -> bool:
        """Whether ``(index, aug_seed)`` keys produce augmented items (training mode + options)."""
        return self.training and (self.random_crop_scale < 1 or self.hflip or self.vflip or self.rot90)

    def train(self, mode: bool = True) -> "ImageDataset":
        """Toggle augmentation. DataLoader workers copy the data set when they start."""
        self.training = mode
        return self

    def __repr__(self) -> str:
        return (f"ImageDataset({self._source.description}: {len(self)} images, "
                f"{self.num_classes} classes, masks={self.has_masks}, "
                f"skipped_at_scan={self.skipped_at_scan}, size={self.image_size})")

    def subset(self, positions: np.ndarray) -> "ImageDataset":
        """A view on some of this data set's items (positions into it), sharing the records."""
        view = copy.copy(self)
        view._rows = self._rows[np.asarray(positions, dtype=np.int64)]
        view._logged_failures = set()
        return view

    # -- items
    def __getitem__(self, key: ItemKey) -> dict[str, torch.Tensor]:
        if isinstance(key, (tuple, list)):
            index, aug_seed = int(key[0]), int(key[1])
        else:
            index, aug_seed = int(key), None
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a data set of {n} images")
        index %= n
        augment = aug_seed is not None and self.augments
        for attempt in range(n):
            position = (index + attempt) % n
            try:
                # a substitute is drawn with the same augmentation parameters
                item = self._load(position, random.Random(aug_seed) if augment else None)
            except UnreadableImage as e:
                self._log_failure(position, e)
                continue
            item["substituted"] = torch.tensor(int(attempt > 0), dtype=torch.int64)
            return item
        raise DataError(f"none of the {n} images of {self._source.description} could be decoded")

    def _log_failure(self, position: int, error: Exception) -> None:
        if position not in self._logged_failures:
            self._logged_failures.add(position)
            name = self._source.records.name(int(self._rows[position]))
            logger.warning("unreadable image %s (%s): replaced by the next readable image", name, error)

    def _load(self, position: int, rng: Optional[random.Random]) -> dict[str, torch.Tensor]:
        row = int(self._rows[position])
        records = self._source.records
        size = self.image_size
        crop_random = rng is not None and self.random_crop_scale < 1
        min_short = size / math.sqrt(self.random_crop_scale) if crop_random else size
        image = load_rgb(records.image(row), min_short_side=min_short)
        width, height = image.size
        box = _crop_box(width, height, rng if crop_random else None, self.random_crop_scale)
        pixels = _to_tensor(image.resize((size, size), Image.Resampling.BICUBIC, box=box))
        mask = None
        if self.has_masks:
            mask_img = load_mask(records.mask(row), records.mask_name(row))
            sx, sy = mask_img.width / width, mask_img.height / height
            mask_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            mask = _to_tensor(mask_img.resize((size, size), Image.Resampling.NEAREST, box=mask_box))
        if rng is not None:
            pixels, mask = self._flip_rotate(pixels, mask, rng)
        item = {
            "image": pixels.float() / 127.5 - 1.0,
            "label": torch.tensor(int(self._source.labels[row]), dtype=torch.int64),
            "index": torch.tensor(position, dtype=torch.int64),
        }
        if mask is not None:
            item["mask"] = (mask > 127).float()
        return item

    def _flip_rotate(self, pixels: torch.Tensor, mask: Optional[torch.Tensor],
                     rng: random.Random) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Flips and quarter turns drawn once, applied to image and mask alike."""
        ops = []
        if self.hflip and rng.random() < 0.5:
            ops.append(lambda x: torch.flip(x, dims=(2,)))
        if self.vflip and rng.random() < 0.5:
            ops.append(lambda x: torch.flip(x, dims=(1,)))
        if self.rot90:
            turns = rng.randrange(4)
            ops.append(lambda x: torch.rot90(x, turns, dims=(1, 2)))
        for op in ops:
            pixels = op(pixels)
            mask = op(mask) if mask is not None else None
        return pixels.contiguous(), (mask.contiguous() if mask is not None else None)


def _crop_box(width: int, height: int, rng: Optional[random.Random],
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


def split_validation(dataset: ImageDataset, n: int) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic hold-out of ``n`` items spread evenly over the data set (so every class of
    a class-folder data set is represented); the validation view never augments."""
    total = len(dataset)
    if n < 0 or n >= total:
        raise DataError(f"cannot hold out {n} validation images from a data set of {total} "
                        "(at least one must remain for training; set data.num_val_images)")
    held = (2 * np.arange(n, dtype=np.int64) + 1) * total // (2 * max(n, 1))   # bin centres
    keep = np.setdiff1d(np.arange(total, dtype=np.int64), held)
    return dataset.subset(keep), dataset.subset(held).train(False)


# ----------------------------------------------------------------------------- local folders

def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _image_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image_file(Path(f)))
    return files


def _read_metadata(root: Path) -> Optional[tuple[Path, list[dict[str, Any]]]]:
    for name in METADATA_FILES:
        path = root / name
        if not path.is_file():
            continue
        rows: list[dict[str, Any]] = []
        if name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}, line {line_no}: invalid JSON ({e})") from None
                    if not isinstance(row, dict):
                        raise DataError(f"{path}, line {line_no}: expected a JSON object")
                    rows.append(row)
        else:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.DictReader(f))
        if rows and any("file_name" not in r for r in rows):
            raise DataError(f"{path}: every row needs a 'file_name' column")
        return path, rows
    return None


def _labels_from_values(values: list[Any]) -> tuple[list[int], list[str]]:
    """Metadata labels: integers as they are, anything else as class names (sorted)."""
    try:
        ints = [int(v) for v in values]
        if all(float(v) == i for v, i in zip(values, ints)) and min(ints) >= 0:
            return ints, [str(i) for i in range(max(ints) + 1)]
    except (TypeError, ValueError):
        pass
    names = sorted({str(v) for v in values})
    lookup = {name: i for i, name in enumerate(names)}
    return [lookup[str(v)] for v in values], names


def _class_of(rel: Path) -> Optional[str]:
    return rel.parts[0] if len(rel.parts) > 1 else None


def _folder_labels(rel_paths: list[Path], root: Path) -> tuple[list[int], list[str]]:
    """Labels from class sub-folders (sorted names -> 0..K-1); -1 everywhere when there are none."""
    classes = [_class_of(p) for p in rel_paths]
    if all(c is None for c in classes):
        return [-1] * len(rel_paths), []
    top_level = [p for p, c in zip(rel_paths, classes) if c is None]
    if top_level:
        raise DataError(f"{root}: has both class sub-folders and images at the top level "
                        f"(e.g. {top_level[0]}); put every image in a class folder or none")
    names = sorted(set(classes))
    lookup = {name: i for i, name in enumerate(names)}
    return [lookup[c] for c in classes], names


def _masks_by_stem(root: Path, rel_images: list[Path]) -> list[Optional[str]]:
    """Pair images with files of ``masks/``: same relative path (any extension), else same stem."""
    folder = root / MASKS_FOLDER
    by_rel: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for path in _image_files(folder):
        rel = path.relative_to(folder)
        by_rel[str(rel.with_suffix(""))] = path
        by_stem.setdefault(rel.stem, []).append(path)
    paired: list[Optional[str]] = []
    for rel in rel_images:
        match = by_rel.get(str(rel.with_suffix("")))
        if match is None:
            candidates = by_stem.get(rel.stem, [])
            if len(candidates) > 1:
                raise DataError(f"{root / rel}: several masks in {folder} match its name "
                                f"({', '.join(str(c.relative_to(folder)) for c in candidates)})")
            match = candidates[0] if candidates else None
        paired.append(str(match) if match is not None else None)
    return paired


def _scan_files(paths: list[str]) -> list[Optional[str]]:
    workers = min(16, 4 * (os.cpu_count() or 1))
    if len(paths) < 64:
        return [_probe(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_probe, paths, chunksize=64))


@dataclass
class _Listing:
    """What a folder's layout says: images (relative paths), their labels and masks."""
    rel_images: list[Path]
    labels: list[int]
    class_names: list[str]
    masks: Optional[list[str]] = None


def _listing_from_metadata(root: Path, meta_path: Path, rows: list[dict[str, Any]],
                           cfg: DataConfig) -> _Listing:
    if not rows:
        raise DataError(f"{meta_path}: no rows (no images listed)")
    rel_images = [Path(r["file_name"]) for r in rows]
    missing = [str(p) for p in rel_images if not (root / p).is_file()]
    if missing:
        raise DataError(f"{meta_path} refers to {len(missing)} missing image file(s) in {root}, "
                        f"e.g. {', '.join(missing[:5])}")
    if any("label" in r for r in rows):
        unlabelled = [r["file_name"] for r in rows if r.get("label") in (None, "")]
        if unlabelled:
            raise DataError(f"{meta_path}: no label for {unlabelled[0]} "
                            f"({len(unlabelled)} row(s) without one)")
        labels, class_names = _labels_from_values([r["label"] for r in rows])
        if all(_class_of(p) for p in rel_images):   # integer labels that match class folders
            folder_labels, folder_names = _folder_labels(rel_images, root)
            if folder_labels == labels and len(folder_names) == len(class_names):
                class_names = folder_names
    else:
        labels, class_names = _folder_labels(rel_images, root)
    listing = _Listing(rel_images, labels, class_names)
    if cfg.masks and any("mask_file_name" in r for r in rows):
        listing.masks = []
        for r in rows:
            name = r.get("mask_file_name")
            if name in (None, ""):
                raise DataError(f"{meta_path}: no mask_file_name for image {r['file_name']} "
                                "(data.masks is set)")
            if not (root / name).is_file():
                raise DataError(f"{meta_path}: mask {name} of image {r['file_name']} "
                                f"does not exist in {root}")
            listing.masks.append(str(root / name))
    return listing


def _listing_from_files(root: Path) -> _Listing:
    files = [p for p in _image_files(root) if p.relative_to(root).parts[0] != MASKS_FOLDER]
    if not files:
        raise DataError(f"{root}: no image files found (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    rel_images = [p.relative_to(root) for p in files]
    return _Listing(rel_images, *_folder_labels(rel_images, root))


def _folder_source(root: Path, cfg: DataConfig) -> _Source:
    metadata = _read_metadata(root)
    listing = _listing_from_metadata(root, *metadata, cfg) if metadata else _listing_from_files(root)
    rel_images, masks = listing.rel_images, listing.masks
    if cfg.masks and masks is None:
        if not (root / MASKS_FOLDER).is_dir():
            raise DataError(f"{root}: data.masks is set but there is neither a '{MASKS_FOLDER}/' "
                            "folder nor a metadata.jsonl/metadata.csv with a mask_file_name column")
        paired = _masks_by_stem(root, rel_images)
        missing = [str(root / rel) for rel, m in zip(rel_images, paired) if m is None]
        if missing:
            raise DataError(f"no mask in {root / MASKS_FOLDER} for image {missing[0]} "
                            f"({len(missing)} image(s) without a mask)")
        masks = [str(m) for m in paired]

    images = [str(root / rel) for rel in rel_images]
    problems = _scan_files(images)
    if masks is not None:
        for i, mask in enumerate(masks):
            if problems[i] is None and os.path.getsize(mask) == 0:
                problems[i] = f"its mask {mask} is an empty file"
    skipped = [(path, why) for path, why in zip(images, problems) if why is not None]
    for path, why in skipped[:_LOG_EACH_SKIPPED]:
        logger.warning("skipping %s: %s", path, why)
    if len(skipped) > _LOG_EACH_SKIPPED:
        logger.warning("skipped %d more unreadable files in %s", len(skipped) - _LOG_EACH_SKIPPED, root)
    if len(skipped) == len(images):
        raise DataError(f"{root}: all {len(images)} image files are unreadable "
                        f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
    rows_kept = np.array([i for i, why in enumerate(problems) if why is None], dtype=np.int64)
    return _Source(
        records=_FileRecords(images, masks),
        rows=rows_kept,
        labels=np.asarray(listing.labels, dtype=np.int64),
        class_names=listing.class_names,
        skipped_files=[path for path, _ in skipped],
        has_masks=masks is not None,
        description=str(root),
    )


# ----------------------------------------------------------------------------- datasets sources

def _arrow_source(table: Any, cfg: DataConfig, origin: str) -> _Source:
    """A ``datasets.Dataset``: image column (Image feature), optional label and mask columns."""
    import datasets

    features = table.features
    image_columns = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    image_column = next((c for c in ("image", "img") if c in image_columns), None) or \
        next((c for c in image_columns if c != "mask"), None)
    if image_column is None:
        raise DataError(f"{origin}: no image column (a datasets.Image feature) among the columns "
                        f"{', '.join(features)}")
    mask_column = None
    if cfg.masks:
        if "mask" not in features or not isinstance(features["mask"], datasets.Image):
            raise DataError(f"{origin}: data.masks is set but there is no 'mask' image column "
                            f"(columns: {', '.join(features)})")
        mask_column = "mask"
    label_column = next((c for c in ("label", "labels") if c in features), None)
    n = len(table)
    if n == 0:
        raise DataError(f"{origin}: the data set has no rows")
    class_names: list[str] = []
    labels = np.full(n, -1, dtype=np.int64)
    if label_column is not None:
        feature = features[label_column]
        values = list(table[label_column])
        if isinstance(feature, datasets.ClassLabel):
            labels, class_names = np.asarray(values, dtype=np.int64), list(feature.names)
        else:
            ints, class_names = _labels_from_values(values)
            labels = np.asarray(ints, dtype=np.int64)
    # rows are read whole: keep only the image columns, undecoded (decoding happens in load_rgb)
    undecoded = table.select_columns([image_column] + ([mask_column] if mask_column else []))
    undecoded = undecoded.cast_column(image_column, datasets.Image(decode=False))
    if mask_column is not None:
        undecoded = undecoded.cast_column(mask_column, datasets.Image(decode=False))
    empty = _empty_rows(undecoded, image_column)
    if mask_column is not None:
        no_mask = _empty_rows(undecoded, mask_column)
        if no_mask.any():
            first = int(np.flatnonzero(no_mask)[0])
            raise DataError(f"{origin}: row {first} has no mask ({int(no_mask.sum())} row(s) "
                            "without one; data.masks is set)")
    if empty.all():
        raise DataError(f"{origin}: every row's image is empty")
    skipped = [f"{origin}[{i}]" for i in np.flatnonzero(empty)]
    for name in skipped[:_LOG_EACH_SKIPPED]:
        logger.warning("skipping %s: empty image", name)
    return _Source(
        records=_ArrowRecords(undecoded, image_column, mask_column, origin),
        rows=np.flatnonzero(~empty).astype(np.int64),
        labels=labels,
        class_names=class_names,
        skipped_files=skipped,
        has_masks=mask_column is not None,
        description=origin,
    )


def _empty_rows(table: Any, column: str) -> np.ndarray:
    """Rows whose undecoded image has neither bytes nor a path (read at the Arrow level)."""
    import pyarrow.compute as pc

    values = table.with_format("arrow")[column]
    if hasattr(values, "combine_chunks"):
        values = values.combine_chunks()
    has_bytes = pc.binary_length(pc.struct_field(values, "bytes")).fill_null(0).to_numpy(zero_copy_only=False) > 0
    has_path = pc.utf8_length(pc.struct_field(values, "path")).fill_null(0).to_numpy(zero_copy_only=False) > 0
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    return ~(valid & (has_bytes | has_path))


def _saved_source(root: Path, cfg: DataConfig) -> _Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises several types for damaged folders
        raise DataError(f"{root}: cannot load the save_to_disk data set ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.split not in loaded:
            raise DataError(f"{root}: no split '{cfg.split}' (splits: {', '.join(loaded)}); "
                            "set data.split")
        return _arrow_source(loaded[cfg.split], cfg, f"{root}:{cfg.split}")
    return _arrow_source(loaded, cfg, str(root))


def _hub_source(name: str, cfg: DataConfig) -> _Source:
    import datasets

    try:
        table = datasets.load_dataset(name, split=cfg.split)
    except Exception as e:  # network, authentication, unknown name or split
        raise DataError(f"'{name}' is neither a local folder nor a reachable hub dataset "
                        f"(split '{cfg.split}'): {type(e).__name__}: {e}") from None
    return _arrow_source(table, cfg, f"{name}:{cfg.split}")


def _looks_like_path(text: str) -> bool:
    return os.path.isabs(text) or text.startswith((".", "~")) or text.endswith(("/", os.sep))


def build_dataset(cfg: DataConfig) -> ImageDataset:
    """The training data named by ``cfg.path`` (folder, save_to_disk folder or hub name)."""
    if not cfg.path:
        raise DataError("no data given: data.path is empty (pass --data FOLDER_OR_NAME)")
    path = Path(cfg.path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path}: is a file, not a folder of images or a saved data set")
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            source = _saved_source(path, cfg)
        else:
            if not any(path.iterdir()):
                raise DataError(f"{path}: the folder is empty")
            source = _folder_source(path, cfg)
    elif _looks_like_path(cfg.path):
        raise DataError(f"{path}: no such folder")
    else:
        source = _hub_source(cfg.path, cfg)
    dataset = ImageDataset(source, cfg)
    logger.info("%r", dataset)
    return dataset


# ----------------------------------------------------------------------------- order

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chain): nearby inputs give unrelated seeds."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        z = ((state ^ (value & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state >> 1


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Endless micro-batches of ``(index, aug_seed)`` for one process.

    Epoch e is a permutation drawn from ``torch.Generator`` seeded by (seed, e); each step
    takes ``batch_size * world_size`` consecutive items of it (the last incomplete global
    batch is dropped) and process ``rank`` takes its contiguous slice. ``start_batch``
    micro-batches are skipped, so a resumed run continues with exactly the batches an
    uninterrupted run would have seen. Augmentation seeds come from (seed, epoch, position).
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, start_batch: int = 0):
        if batch_size < 1 or world_size < 1 or start_batch < 0:
            raise DataError(f"batch sampler: need batch_size >= 1, world_size >= 1, start_batch >= 0 "
                            f"(got {batch_size}, {world_size}, {start_batch})")
        if not 0 <= rank < world_size:
            raise DataError(f"batch sampler: rank {rank} is not in [0, {world_size})")
        if num_items < batch_size * world_size:
            raise DataError(f"the data set has {num_items} images, fewer than one global batch of "
                            f"{batch_size * world_size} (batch size {batch_size} x {world_size} "
                            "processes); lower train.batch_size or add images")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_batch
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = num_items // self.global_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.num_items, generator=generator)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batch = self.start_batch
        epoch, order = -1, None
        while True:
            batch_epoch, step = divmod(batch, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, order = batch_epoch, self.permutation(batch_epoch).tolist()
            start = step * self.global_batch + self.rank * self.batch_size
            yield [(order[p], mix_seed(self.seed, epoch, p)) for p in range(start, start + self.batch_size)]
            batch += 1


def _ignore_stop_signals(worker_id: int) -> None:
    """A scheduler's SIGTERM goes to the whole process group: workers must not die of it
    before the main process has saved its checkpoint (they exit when it does)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1, start_batch: int = 0, num_workers: int = 0,
                pin_memory: Optional[bool] = None) -> DataLoader:
    """An endless DataLoader over ``dataset`` (items keyed by ``(index, aug_seed)``) in
    :class:`ResumableBatchSampler` order.

    Do not pass it through ``accelerator.prepare``: it is already sharded by rank.
    """
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, start_batch)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
    )
