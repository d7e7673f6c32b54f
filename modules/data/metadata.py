"""An image folder's metadata table (``metadata.jsonl`` or ``metadata.csv``, the HF ``imagefolder``
convention): reading it, checking each row's types and paths, and the labels it gives.

Every row needs a ``file_name``; ``mask_file_name``, ``label`` and a caption column are optional.
Paths must be relative and stay inside the data folder.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Optional

from modules.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


def read_metadata(root: Path) -> Optional[tuple[Path, list[dict[str, Any]]]]:
    """``(path, rows)`` of the folder's metadata table, its rows' types checked; None without one."""
    for name in METADATA_FILES:
        path = root / name
        if not path.is_file():
            continue
        rows: list[dict[str, Any]] = []
        try:
            text = path.read_text(encoding="utf-8-sig")     # a spreadsheet's byte-order mark is not a column
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
        if name.endswith(".jsonl"):
            for line_no, line in enumerate(text.splitlines(), 1):
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
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
        for line_no, row in enumerate(rows, 1):
            for column in ("file_name", "mask_file_name"):
                if column == "file_name" and column not in row:
                    raise DataError(f"{path}: every row needs a 'file_name' column (row {line_no} has "
                                    f"{', '.join(map(str, row)) or 'none'})")
                value = row.get(column)
                if (column == "file_name" or value not in (None, "")) and not (isinstance(value, str) and value):
                    raise DataError(f"{path}, row {line_no}: '{column}' must be a path string, got {value!r}")
        return path, rows
    return None


def path_inside(root: Path, name: str, where: str) -> Path:
    """``root / name`` for a relative path that stays inside ``root``; anything else is refused."""
    normal = os.path.normpath(name)
    if os.path.isabs(name) or normal == ".." or normal.startswith(".." + os.sep):
        raise DataError(f"{where}: {name!r} is outside the data folder {root}; metadata paths must be "
                        "relative paths inside it")
    return root / normal


def labels_from_values(values: list[Any]) -> tuple[list[int], list[str]]:
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
