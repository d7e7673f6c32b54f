"""An image folder's metadata table (``metadata.jsonl`` or ``metadata.csv``, the HF ``imagefolder``
convention): reading it, checking each row's types and paths, and the labels it gives.

Every row needs a ``file_name``; ``mask_file_name``, ``label`` and a caption column are optional.
The file is read a line at a time: a line is split on ``\\n`` only, holds at most
:data:`MAX_METADATA_LINE` bytes and must be UTF-8 (a byte-order mark is allowed); a problem is
one :class:`DataError` naming the file, the line (and the byte, for an encoding error) and the
value. Paths are checked as they are written (:func:`path_inside`): relative, and never climbing
out of the data folder. Labels (:func:`labels_from_values`) are integers (class numbers below
:data:`MAX_CLASSES`) or names (text), nothing else.
"""
from __future__ import annotations

import codecs
import csv
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from modules.data.image_io import MASKS_FOLDER
from modules.errors import DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MAX_CLASSES = 1 << 20           # the bound of a network's num_classes (modules.core.networks.denoiser.Sizes)
MAX_METADATA_LINE = 1 << 20     # bytes in one line of a metadata file (a caption of a megabyte is not a caption)
PATH_COLUMNS = ("file_name", "mask_file_name")
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*")     # an integer written as text (ASCII digits: int() takes more)


def shown(value: Any, limit: int = 80) -> str:
    """A value as a one-line message shows it: its repr, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass
class Metadata:
    """A metadata table: its rows (dicts, in file order) and the line each row ends on."""
    path: Path
    rows: list[dict[str, Any]]
    lines: list[int]

    def where(self, row: int) -> str:
        return f"{self.path}, line {self.lines[row]}"


def _lines(path: Path, error: type[Exception] = DataError,
           one_line: str = "a metadata line holds one image's fields") -> Iterator[tuple[int, str]]:
    """``(line number, text with its line end)`` of each line, read lazily and bounded, decoded as UTF-8; a
    problem raises ``error`` naming the file and the line (``one_line``: what a line is, for the length bound)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    with f:
        offset = 0
        for number in range(1, sys.maxsize):
            try:
                raw = f.readline(MAX_METADATA_LINE + 2)
            except OSError as e:
                raise error(f"{path}, line {number}: cannot be read ({e.strerror or e})") from None
            if not raw:
                return
            start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):     # a spreadsheet's byte-order mark
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            if len(raw) - raw.endswith(b"\n") > MAX_METADATA_LINE:
                raise error(f"{path}, line {number}: longer than {MAX_METADATA_LINE} bytes; {one_line}")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise error(f"{path}, line {number}: not UTF-8 text (byte {start + e.start} is "
                            f"0x{raw[e.start]:02x}); save the file as UTF-8") from None
            yield number, text


def jsonl_rows(path: Path, error: type[Exception] = DataError,
               one_line: str = "a metadata line holds one image's fields") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of each non-blank line of a JSON-lines file, read as :func:`_lines` reads."""
    for number, text in _lines(path, error, one_line):
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except RecursionError:
            raise error(f"{path}, line {number}: JSON nested too deeply") from None
        except ValueError as e:     # JSONDecodeError, and numbers of more digits than Python converts
            raise error(f"{path}, line {number}: invalid JSON ({e})") from None


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(text for _, text in _lines(path))
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:      # a field above csv's size limit, a NUL byte
            raise DataError(f"{path}, line {reader.reader.line_num}: not a CSV row ({e})") from None
        yield reader.line_num, row


def _check_row(row: Any, where: str) -> None:
    """A row's fields that the toolkit reads have the types it needs."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object (one image's fields), got {shown(row)}")
    if "file_name" not in row:
        raise DataError(f"{where}: every row needs a 'file_name' column (this one has "
                        f"{', '.join(shown(k) for k in row) or 'none'})")
    for column in PATH_COLUMNS:
        value = row.get(column)
        if column != "file_name" and value in (None, ""):
            continue
        if not isinstance(value, str) or not value or "\0" in value:
            raise DataError(f"{where}: '{column}' must be a path (text), got {shown(value)}")
    label = row.get("label")
    if label not in (None, "") and (isinstance(label, bool) or not isinstance(label, (int, float, str))):
        raise DataError(f"{where}: label {shown(label)} is neither a class number nor a class name")


def read_metadata(root: Path) -> Optional[Metadata]:
    """The folder's metadata table, its rows' types checked; None without one."""
    for name in METADATA_FILES:
        path = root / name
        if not path.is_file():
            continue
        rows, lines = [], []
        for number, row in (jsonl_rows(path) if name.endswith(".jsonl") else _csv_rows(path)):
            _check_row(row, f"{path}, line {number}")
            rows.append(row)
            lines.append(number)
        return Metadata(path, rows, lines)
    return None


def path_inside(root: Path, name: str, where: str, absolute: bool = False) -> Path:
    """``root / name`` for a path that, as written, stays inside ``root`` (no ``..`` climbing out; with
    ``absolute``, an absolute path inside ``root`` too); anything else is refused. Links are not
    resolved: a link the user made inside the folder is followed, as links to class folders are."""
    normal = os.path.normpath(name)
    if os.path.isabs(normal):
        base = os.path.normpath(os.path.abspath(root))
        if absolute and (normal + os.sep).startswith(base + os.sep) and normal != base:
            return Path(normal)
    elif normal != ".." and not normal.startswith(".." + os.sep) and normal != ".":
        return root / normal
    if normal == ".":
        raise DataError(f"{where}: {name!r} names the data folder {root} itself, not a file in it")
    raise DataError(f"{where}: {name!r} is outside the data folder {root}; paths must be "
                    f"{'inside it' if absolute else 'relative paths inside it'}")


def image_path(root: Path, meta: Metadata, row: int) -> Path:
    """The image file row ``row`` names (``file_name``): inside ``root`` as written (:func:`path_inside`),
    and not in a ``masks/`` folder (masks are never training images)."""
    name = meta.rows[row]["file_name"]
    path = path_inside(root, name, f"{meta.where(row)}, file_name")
    if MASKS_FOLDER in path.relative_to(root).parts[:-1]:
        raise DataError(f"{meta.where(row)}: file_name {shown(name)} is in a {MASKS_FOLDER}/ folder, which holds "
                        "masks, not images (name masks in mask_file_name; rename the folder if these are images)")
    return path


def listed_images(root: Path) -> Optional[list[Path]]:
    """The images a folder's metadata table lists, in its order, or None without a table: what every reader
    of an image folder (training, ``evaluate.py``) takes from it, read and checked alike."""
    meta = read_metadata(root)
    return None if meta is None else [image_path(root, meta, i) for i in range(len(meta.rows))]


def check_class_count(count: int, where: str) -> None:
    if count > MAX_CLASSES:
        raise DataError(f"{where}: {count} classes, more than the {MAX_CLASSES} a network can embed")


def _class_number(value: Any) -> Optional[int]:
    """The class number a label stands for; None for a name; ValueError for anything else."""
    if isinstance(value, bool) or value is None:
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float):    # JSON's 3.0 is the number 3
        if math.isfinite(value) and value.is_integer():
            return int(value)
        raise ValueError
    if isinstance(value, str):
        return int(value) if _INTEGER.fullmatch(value) else None     # ValueError past 4300 digits
    raise ValueError


def class_number(value: Any, where: str) -> int:
    """One label that must be a class number (a stream's ``.cls``): an integer 0 to ``MAX_CLASSES - 1``, as an
    int or as text; anything else is refused, naming ``where``."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            pass
    try:
        number = _class_number(value)
    except (ValueError, OverflowError):
        number = None
    if number is None or not 0 <= number < MAX_CLASSES:
        raise DataError(f"{where}: label {shown(value)} is not a class number 0 to {MAX_CLASSES - 1}")
    return number


def labels_from_values(values: Sequence[Any], where: Callable[[int], str]) -> tuple[list[int], list[str]]:
    """Labels and class names: class numbers as they are (the names ``0 .. max``), when every label is
    one; otherwise every label is a name (sorted names -> 0..K-1). A value that is neither (a
    non-integral or non-finite number, a boolean, a list, an object, nothing) or a number outside
    ``0 .. MAX_CLASSES - 1`` is refused, naming its row (``where(i)``), before any class is made."""
    if not len(values):
        return [], []
    numbers: list[Optional[int]] = []
    for i, value in enumerate(values):
        try:
            numbers.append(_class_number(value))
        except (ValueError, OverflowError):
            raise DataError(f"{where(i)}: label {shown(value)} is neither a class number (an integer 0 to "
                            f"{MAX_CLASSES - 1}) nor a class name (text)") from None
    if all(n is not None for n in numbers):
        for i, n in enumerate(numbers):
            if not 0 <= n < MAX_CLASSES:
                raise DataError(f"{where(i)}: label {shown(values[i])} is not a class number 0 to {MAX_CLASSES - 1} "
                                f"(at most {MAX_CLASSES} classes); name classes with text to use other values")
        return numbers, [str(i) for i in range(max(numbers) + 1)]      # type: ignore[type-var]
    names = sorted({str(v) for v in values})
    check_class_count(len(names), where(0))
    lookup = {name: i for i, name in enumerate(names)}
    return [lookup[str(v)] for v in values], names
