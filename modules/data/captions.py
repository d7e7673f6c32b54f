"""Captions of a training data set (``cond.type=text``): one prompt per image.

They come from a column (``cond.caption_column``, default ``text``) of the folder's
``metadata.jsonl`` / ``metadata.csv`` or of a ``datasets`` data set. An image without one (no
column, an empty or missing value) is an error naming it, or, with ``cond.allow_empty_caption``,
trains with the empty prompt (counted in one warning). Captions are part of the data's
fingerprint, so an edited caption gets fresh text embeddings in the latent store.
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Callable, Optional, Sequence

from modules.errors import DataError

logger = logging.getLogger(__name__)


def read_captions(values: Optional[Sequence[Any]], rows: Sequence[int], name: Callable[[int], str], column: str,
                  allow_empty: bool, where: str) -> list[str]:
    """The caption of every record (``values``: the column, None when the source has no such column);
    only the records in ``rows`` (those training uses) must have one."""
    count = len(values) if values is not None else max(rows, default=-1) + 1
    captions = [""] * count
    missing = []
    for row in rows:
        value = values[row] if values is not None else None
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: the caption ('{column}') of {name(row)} must be text, got {value!r}")
        if value is None or not value.strip():
            missing.append(row)
        else:
            captions[row] = value
    if missing and not allow_empty:
        how = f"no '{column}' column" if values is None else f"an empty '{column}'"
        raise DataError(f"{where}: image {name(missing[0])} has no caption ({how}; {len(missing)} image(s) without "
                        "one): add it, set cond.caption_column, or train those with the empty prompt "
                        "(cond.allow_empty_caption=true)")
    if missing:
        logger.warning("%d image(s) without a caption ('%s') train with the empty prompt (cond.allow_empty_caption)",
                       len(missing), column)
    return captions


def with_captions(fingerprint: str, captions: Optional[list[str]]) -> str:
    """A data fingerprint that also changes when any caption changes."""
    if captions is None:
        return fingerprint
    return hashlib.sha256((fingerprint + json.dumps(captions)).encode()).hexdigest()
