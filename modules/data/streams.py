"""Sources read as streams, for encoding a latent store of a set too large to list file by file.

* **WebDataset tar shards**: a list of ``.tar`` files (a folder of them, a glob such as
  ``/data/imagenet/train-*.tar``, or a brace pattern ``train-{000000..001023}.tar``), each holding
  samples ``KEY.jpg|jpeg|png|webp`` with ``KEY.cls`` (the label), ``KEY.txt`` or ``KEY.json`` (the
  caption). Read through ``datasets``' own ``webdataset`` loader in streaming mode: ``datasets`` is
  already a dependency (no new package), it reads each tar sequentially (no per-file listing, no
  random access), groups a sample's files by key, and gives each tar as one shard (``n_shards``),
  so a store shard is one input tar and a killed encode resumes at the first unfinished one.
* **``datasets`` streaming**: a hub data set read with ``streaming=True`` (``data.streaming=true``),
  sharded by its own files.

Each sample is decoded and cropped exactly as the image data set does it without augmentation
(:func:`modules.data.image_io.square_image`), so a store made from a stream equals one made from the
same images in a folder.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from modules import durable
from modules.data.image_io import UnreadableImage, square_image
from modules.data.metadata import class_number
from modules.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "image", "img")
CAPTION_KEYS = ("txt", "caption", "text")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_tars(pattern: str) -> list[str]:
    """The tar files a path names: a folder (its ``*.tar``), a glob, or a ``{000..123}`` brace range."""
    path = Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.tar"))
    else:
        match = _BRACES.search(pattern)
        if match:
            low, high = match.group(1), match.group(2)
            files = [pattern[:match.start()] + str(i).zfill(len(low)) + pattern[match.end():]
                     for i in range(int(low), int(high) + 1)]
        else:
            files = sorted(glob.glob(str(path)))
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{pattern}: {len(missing)} tar file(s) missing, e.g. {missing[0]}")
    return files


def is_tar_source(path: str) -> bool:
    """Whether ``data.path`` names WebDataset tar shards rather than an image folder or a data set."""
    p = Path(path).expanduser()
    if p.is_dir():
        return any(p.glob("*.tar")) and not (p / "dataset_dict.json").is_file() and not (p / "state.json").is_file()
    return path.endswith(".tar") or bool(_BRACES.search(path)) and ".tar" in path


class StreamSource:
    """Samples of tar shards or a streamed hub data set, shard by shard."""

    def __init__(self, path: str, image_size: int, split: str = "train", caption_column: Optional[str] = None,
                 allow_empty_caption: bool = False):
        import datasets
        datasets.disable_progress_bars()
        self.path, self.image_size = path, image_size
        self.caption_column, self.allow_empty = caption_column, allow_empty_caption
        if is_tar_source(path):
            self.files = expand_tars(path)
            if not self.files:
                raise DataError(f"{path}: no .tar files")
            self.stream = datasets.load_dataset("webdataset", data_files={split: self.files}, split=split,
                                                streaming=True)
            stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in self.files]
            self.identity = durable.fingerprint({"tars": stats})
        else:
            try:
                self.stream = datasets.load_dataset(path, split=split, streaming=True)
            except Exception as e:  # network, authentication, unknown name or split
                raise DataError(f"'{path}' cannot be streamed (split '{split}'): {type(e).__name__}: {e}") from None
            self.files = []
            self.identity = durable.fingerprint({"hub": path, "split": split,
                                                 "info": str(getattr(self.stream, "info", ""))})
        columns = list(self.stream.features or {})
        self.image_column = next((c for c in IMAGE_KEYS if c in columns), None)
        if self.image_column is None:
            raise DataError(f"{path}: no image in its samples (looked for {', '.join(IMAGE_KEYS)}; found "
                            f"{', '.join(columns)})")
        self.stream = self.stream.cast_column(self.image_column, datasets.Image(decode=False))
        self.label_column = next((c for c in ("cls", "label", "labels") if c in columns), None)

    @property
    def n_shards(self) -> int:
        return self.stream.n_shards

    def caption_of(self, sample: dict[str, Any], key: str) -> str:
        column = self.caption_column
        value = None
        if column in CAPTION_KEYS or column in sample:
            value = sample.get(column if column in sample else next((c for c in CAPTION_KEYS if c in sample), ""))
        if value is None and "json" in sample and isinstance(sample["json"], dict):
            value = sample["json"].get(column)
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str) or not value.strip():
            if self.allow_empty:
                return ""
            raise DataError(f"{self.path}: sample {key} has no caption ('{column}'); set cond.caption_column or "
                            "cond.allow_empty_caption=true")
        return value

    def items(self, shard: int) -> Iterator[dict[str, Any]]:
        """The samples of one shard as image-data-set items (image, label, key, index within the shard,
        caption when asked for); an unreadable image is skipped, counted in the log."""
        skipped = 0
        for i, sample in enumerate(self.stream.shard(num_shards=self.n_shards, index=shard)):
            key = str(sample.get("__key__", f"{shard}:{i}"))
            value = sample[self.image_column]
            data = value.get("bytes") if isinstance(value, dict) else None
            if not data:
                skipped += 1
                continue
            try:
                image = square_image(io.BytesIO(data), self.image_size)
            except UnreadableImage as e:
                skipped += 1
                logger.warning("skipping %s in %s: %s", key, self.path, e)
                continue
            label = class_number(sample[self.label_column], f"{self.path}, sample {key}") if self.label_column else -1
            item = {"image": image, "label": label, "key": key, "index": i, "substituted": 0}
            if self.caption_column is not None:
                item["caption"] = self.caption_of(sample, key)
            yield item
        if skipped:
            logger.warning("%s shard %d: %d unreadable sample(s) skipped", self.path, shard, skipped)
