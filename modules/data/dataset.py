"""The image data set of both training stages: lazily decoded, augmented items with labels and masks.

:class:`ImageDataset` reads the records of a :class:`modules.data.sources.Source`. An item is
addressed as ``index`` (never augmented) or ``(index, aug_seed)``: augmentation parameters come
from ``random.Random(aug_seed)``, so an item is a pure function of its key (the read order is
:mod:`modules.data.order`). An image that fails while decoding (e.g. a truncated file) is replaced
by the next readable index, deterministically, and the item is flagged ``substituted``.

Items: ``image`` RGB float32 [3, S, S] in [-1, 1]; ``mask`` float32 [1, S, S] in {0, 1};
``label`` (-1 when unlabelled); ``caption`` (a string, for a data set built with
captions). Augmentation (random resized square crop, flips, rot90) is
applied jointly to an image and its mask.
"""
from __future__ import annotations

import copy
import logging
import math
import random
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from modules.config.schema import DataConfig
from modules.data.captions import read_captions
from modules.data.image_io import UnreadableImage, crop_box, load_mask, load_rgb, square_pixels, to_tensor
from modules.data.order import held_out
from modules.data.sources import Source, open_source
from modules.errors import DataError

logger = logging.getLogger(__name__)

ItemKey = Union[int, tuple[int, int]]


class ImageDataset(Dataset):
    """Lazily decoded images (and masks) with labels; see the module docstring for items."""

    def __init__(self, source: Source, cfg: DataConfig):
        self._source = source
        self._rows = source.rows
        self.image_size = cfg.image_size
        self.random_crop_scale = cfg.random_crop_scale
        self.hflip, self.vflip, self.rot90 = cfg.hflip, cfg.vflip, cfg.rot90
        self.training = True
        self._logged_failures: set[int] = set()
        self.class_names: list[str] = list(source.class_names)
        self.has_masks: bool = source.has_masks
        self.skipped_files: list[str] = list(source.skipped_files)   # dropped by the header scan

    # -- facts
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def skipped_at_scan(self) -> int:
        return len(self.skipped_files)

    def fingerprint(self) -> str:
        """Identity of the data set's files (see ``Source.fingerprint``)."""
        return self._source.fingerprint()

    def key(self, position: int) -> str:
        """The source's name of item ``position`` (a file path, or ``data set[row]``): what a latent store records."""
        return self._source.records.name(int(self._rows[position]))

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
        box = crop_box(width, height, rng if crop_random else None, self.random_crop_scale)
        pixels = square_pixels(image, box, size)      # as image_io.square_image when not augmented
        mask = None
        if self.has_masks:
            mask_img = load_mask(records.mask(row), records.mask_name(row))
            sx, sy = mask_img.width / width, mask_img.height / height
            mask_box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            mask = to_tensor(mask_img.resize((size, size), Image.Resampling.NEAREST, box=mask_box))
        if rng is not None:
            pixels, mask = self._flip_rotate(pixels, mask, rng)
        item = {
            "image": pixels.float() / 127.5 - 1.0,
            "label": torch.tensor(int(self._source.labels[row]), dtype=torch.int64),
            "index": torch.tensor(position, dtype=torch.int64),
        }
        if mask is not None:
            item["mask"] = (mask > 127).float()
        if self._source.captions is not None:
            item["caption"] = self._source.captions[row]
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


def split_validation(dataset: ImageDataset, n: int) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic hold-out of ``n`` items spread evenly over the data set (so every class of
    a class-folder data set is represented); the validation view never augments."""
    total = len(dataset)
    if n < 0 or n >= total:
        raise DataError(f"cannot hold out {n} validation images from a data set of {total} "
                        "(at least one must remain for training; set data.num_val_images)")
    held = held_out(total, n)
    keep = np.setdiff1d(np.arange(total, dtype=np.int64), held)
    return dataset.subset(keep), dataset.subset(held).train(False)


def build_dataset(cfg: DataConfig, caption_column: Optional[str] = None, allow_empty_caption: bool = False,
                  masks: bool = False) -> ImageDataset:
    """The training data named by ``cfg.path`` (folder, save_to_disk folder or hub name); items carry
    their ``caption`` from ``caption_column`` when it is given (see modules/data/captions.py), and their
    ``mask`` with ``masks``."""
    source = open_source(cfg, masks)
    if caption_column is not None:
        source.captions = read_captions(source.records.column(caption_column), source.rows, source.records.name,
                                        caption_column, allow_empty_caption, source.description)
    dataset = ImageDataset(source, cfg)
    logger.info("%r", dataset)
    return dataset
