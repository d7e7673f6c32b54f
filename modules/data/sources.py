"""Where training images come from: a local image folder, a ``save_to_disk`` folder, or the hub.

:func:`open_source` turns ``data.path`` into a :class:`Source`: the image (and mask) records,
their labels and class names, and the files skipped by a cheap header scan (empty files,
files PIL cannot identify, decompression bombs), each logged. Local folders follow the HF
``imagefolder`` layout: class sub-folders give labels; ``metadata.jsonl`` / ``metadata.csv``
(``file_name``, optional ``label``, ``mask_file_name`` and a caption column) list images and pair masks, or a
``masks/`` folder pairs them by path or stem. A ``masks/`` folder never holds training images.
Every path a metadata file or a ``save_to_disk`` row names must lie inside the data folder, as
written (links the user made inside it are followed, as class-folder links are).
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from modules.config.io import looks_like_path
from modules.config.schema import DataConfig
from modules.data.captions import with_captions
from modules.data.image_io import IMAGE_EXTENSIONS, MASKS_FOLDER, UnreadableImage, find_images, probe_image
from modules.data.metadata import (Metadata, check_class_count, image_path, labels_from_values, path_inside,
                                   read_metadata)
from modules.errors import DataError

logger = logging.getLogger(__name__)

_LOG_EACH_SKIPPED = 20      # skipped files logged one by one; the rest only counted


# ----------------------------------------------------------------------------- records

class FileRecords:
    """Images (and masks) as files of a local folder; ``metadata``: its metadata rows, one per image."""

    def __init__(self, images: list[str], masks: Optional[list[str]], metadata: Optional[list[dict]] = None):
        self.images = images
        self.masks = masks
        self.metadata = metadata

    def column(self, name: str) -> Optional[list[Any]]:
        """A metadata column's value per image (None when no row has it)."""
        if self.metadata is None or not any(name in row for row in self.metadata):
            return None
        return [row.get(name) for row in self.metadata]

    def fingerprint(self) -> str:
        """Changes when any listed file is added, removed or replaced: its path, size, mtime, ctime
        and inode (the fields git's index watches; ``cp -p`` keeps a replaced file's size and mtime,
        never its ctime or inode), without reading the files."""
        h = hashlib.sha256()
        for path in [*self.images, *(self.masks or [])]:
            h.update(_file_identity(path))
        return h.hexdigest()

    def name(self, row: int) -> str:
        return self.images[row]

    def image(self, row: int) -> str:
        return self.images[row]

    def mask(self, row: int) -> str:
        return self.masks[row]

    def mask_name(self, row: int) -> str:
        return self.masks[row]


def _file_identity(path: str) -> bytes:
    """What :meth:`FileRecords.fingerprint` watches of one file (a vanished file is a change too)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return os.fsencode(path) + f"|{e.errno}\n".encode()
    return os.fsencode(path) + f"|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}\n".encode()


class ArrowRecords:
    """Rows of a ``datasets.Dataset`` whose image columns are read undecoded (bytes / path).

    ``files``: for a ``save_to_disk`` folder, the file of each row whose image (or mask) is only a
    path, per column, checked to lie inside the folder and resolved against it; None for a hub
    data set (its paths are ``datasets``' own download cache)."""

    def __init__(self, table: Any, image_column: str, mask_column: Optional[str], origin: str, whole: Any = None,
                 files: Optional[dict[str, dict[int, str]]] = None):
        self.table = table
        self.image_column = image_column
        self.mask_column = mask_column
        self.origin = origin
        self.whole = whole              # the data set with every column, for captions
        self.files = files

    def column(self, name: str) -> Optional[list[Any]]:
        return list(self.whole[name]) if self.whole is not None and name in self.whole.column_names else None

    def fingerprint(self) -> str:
        """``datasets``' own fingerprint of the table, and the identity (as for a folder's files) of the
        Arrow files it is read from and of every file a row names by path: a ``save_to_disk`` folder
        keeps its recorded fingerprint when its files are replaced."""
        h = hashlib.sha256(f"{self.table._fingerprint}|{self.image_column}|{self.mask_column}\n".encode())
        tables = self.whole if self.whole is not None else self.table
        arrow_files = {os.path.abspath(f["filename"]) for f in tables.cache_files}
        for path in sorted(arrow_files):
            h.update(_file_identity(path))
        for column in sorted(self.files or {}):
            for row, path in sorted(self.files[column].items()):
                h.update(f"{column}|{row}|".encode() + _file_identity(path))
        return h.hexdigest()

    def name(self, row: int) -> str:
        return f"{self.origin}[{row}]"

    def mask_name(self, row: int) -> str:
        return f"{self.origin}[{row}].{self.mask_column}"

    def _source(self, row: int, column: str) -> Union[str, io.BytesIO]:
        value = self.table[row][column]
        if value is None:
            raise UnreadableImage("no image in this row")
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        path = self.files[column].get(row) if self.files is not None else value.get("path")
        if path:
            return path
        raise UnreadableImage("empty image entry")

    def image(self, row: int) -> Union[str, io.BytesIO]:
        return self._source(row, self.image_column)

    def mask(self, row: int) -> Union[str, io.BytesIO]:
        return self._source(row, self.mask_column)


@dataclass
class Source:
    records: Union[FileRecords, ArrowRecords]
    rows: np.ndarray                # record rows that passed the scan
    labels: np.ndarray              # int64 per record row, -1 when unlabelled
    class_names: list[str]
    skipped_files: list[str]
    has_masks: bool
    description: str
    captions: Optional[list[str]] = None    # per record row, when asked for (modules.data.build_dataset)

    def fingerprint(self) -> str:
        """Identity of the data: part of the latent store's key, and what a resumed run compares."""
        return with_captions(self.records.fingerprint(), self.captions)


# ----------------------------------------------------------------------------- local folders

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
    check_class_count(len(names), str(root))
    lookup = {name: i for i, name in enumerate(names)}
    return [lookup[c] for c in classes], names


def _masks_by_stem(root: Path, rel_images: list[Path]) -> list[Optional[str]]:
    """Pair images with files of ``masks/``: same relative path (any extension), else same stem."""
    folder = root / MASKS_FOLDER
    by_rel: dict[str, Path] = {}
    by_stem: dict[str, list[Path]] = {}
    for path in find_images(folder):
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
        return [probe_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(probe_image, paths, chunksize=64))


@dataclass
class _Listing:
    """What a folder's layout says: images (relative paths), their labels and masks."""
    rel_images: list[Path]
    labels: list[int]
    class_names: list[str]
    masks: Optional[list[str]] = None
    metadata: Optional[list[dict[str, Any]]] = None


def _is_file(path: Path, where: str) -> bool:
    """Whether a path a metadata row names is a file (links followed); a path the system refuses is one line."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:        # a name too long, a link loop, no permission
        raise DataError(f"{where}: the path cannot be used ({e.strerror or e})") from None


def _listing_from_metadata(root: Path, meta: Metadata, masks: bool) -> _Listing:
    rows = meta.rows
    if not rows:
        raise DataError(f"{meta.path}: no rows (no images listed)")
    rel_images, missing = [], []
    for i in range(len(rows)):
        path = image_path(root, meta, i)
        rel_images.append(path.relative_to(root))
        if not _is_file(path, f"{meta.where(i)}, file_name"):
            missing.append(i)
    if missing:
        raise DataError(f"{meta.path} refers to {len(missing)} missing image file(s) in {root}, e.g. "
                        f"{', '.join(str(rel_images[i]) for i in missing[:5])} (line {meta.lines[missing[0]]})")
    if any("label" in r for r in rows):
        unlabelled = [i for i, r in enumerate(rows) if r.get("label") in (None, "")]
        if unlabelled:
            raise DataError(f"{meta.where(unlabelled[0])}: no label for {rows[unlabelled[0]]['file_name']} "
                            f"({len(unlabelled)} row(s) without one)")
        labels, class_names = labels_from_values([r["label"] for r in rows], meta.where)
        if all(_class_of(p) for p in rel_images):   # integer labels that match class folders
            folder_labels, folder_names = _folder_labels(rel_images, root)
            if folder_labels == labels and len(folder_names) == len(class_names):
                class_names = folder_names
    else:
        labels, class_names = _folder_labels(rel_images, root)
    listing = _Listing(rel_images, labels, class_names, metadata=rows)
    if masks and any("mask_file_name" in r for r in rows):
        listing.masks = []
        for i, r in enumerate(rows):
            name = r.get("mask_file_name")
            if name in (None, ""):
                raise DataError(f"{meta.where(i)}: no mask_file_name for image {r['file_name']} "
                                "(masks are needed: cond.type=mask)")
            mask = path_inside(root, name, f"{meta.where(i)}, mask_file_name")
            if not _is_file(mask, f"{meta.where(i)}, mask_file_name"):
                raise DataError(f"{meta.where(i)}: mask {name} of image {r['file_name']} "
                                f"does not exist in {root}")
            listing.masks.append(str(mask))
    return listing


def _listing_from_files(root: Path) -> _Listing:
    files = find_images(root)       # leaves out masks/ folders and this toolkit's output folders
    if not files:
        raise DataError(f"{root}: no image files found (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    rel_images = [p.relative_to(root) for p in files]
    return _Listing(rel_images, *_folder_labels(rel_images, root))


def _log_skipped(skipped: list[tuple[str, str]], where: str) -> None:
    for name, why in skipped[:_LOG_EACH_SKIPPED]:
        logger.warning("skipping %s: %s", name, why)
    if len(skipped) > _LOG_EACH_SKIPPED:
        logger.warning("skipped %d more unreadable files in %s", len(skipped) - _LOG_EACH_SKIPPED, where)


def _folder_source(root: Path, masks_needed: bool) -> Source:
    metadata = read_metadata(root)
    listing = _listing_from_metadata(root, metadata, masks_needed) if metadata else _listing_from_files(root)
    rel_images, masks = listing.rel_images, listing.masks
    if masks_needed and masks is None:
        if not (root / MASKS_FOLDER).is_dir():
            raise DataError(f"{root}: masks are needed (cond.type=mask) but there is neither a '{MASKS_FOLDER}/' "
                            "folder nor a metadata.jsonl/metadata.csv with a mask_file_name column")
        paired = _masks_by_stem(root, rel_images)
        missing = [str(root / rel) for rel, m in zip(rel_images, paired) if m is None]
        if missing:
            raise DataError(f"no mask in {root / MASKS_FOLDER} for image {missing[0]} "
                            f"({len(missing)} image(s) without a mask)")
        masks = [str(m) for m in paired]

    images = [str(root / rel) for rel in rel_images]
    problems = _scan_files(images)
    if masks is not None:       # a mask is scanned as its image is (empty, not an image, a decompression bomb)
        for i, why in enumerate(_scan_files(masks)):
            if problems[i] is None and why is not None:
                problems[i] = f"its mask {masks[i]}: {why}"
    skipped = [(path, why) for path, why in zip(images, problems) if why is not None]
    _log_skipped(skipped, str(root))
    if len(skipped) == len(images):
        raise DataError(f"{root}: all {len(images)} image files are unreadable "
                        f"(e.g. {skipped[0][0]}: {skipped[0][1]})")
    rows_kept = np.array([i for i, why in enumerate(problems) if why is None], dtype=np.int64)
    return Source(
        records=FileRecords(images, masks, listing.metadata),
        rows=rows_kept,
        labels=np.asarray(listing.labels, dtype=np.int64),
        class_names=listing.class_names,
        skipped_files=[path for path, _ in skipped],
        has_masks=masks is not None,
        description=str(root),
    )


# ----------------------------------------------------------------------------- datasets sources

def _arrow_source(table: Any, masks: bool, origin: str, root: Optional[Path] = None) -> Source:
    """A ``datasets.Dataset``: image column (Image feature), optional label and mask columns. ``root``: the
    ``save_to_disk`` folder it was loaded from, which every path a row holds must lie inside."""
    import datasets

    features = table.features
    image_columns = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    image_column = next((c for c in ("image", "img") if c in image_columns), None) or \
        next((c for c in image_columns if c != "mask"), None)
    if image_column is None:
        raise DataError(f"{origin}: no image column (a datasets.Image feature) among the columns "
                        f"{', '.join(features)}")
    mask_column = None
    if masks:
        if "mask" not in features or not isinstance(features["mask"], datasets.Image):
            raise DataError(f"{origin}: masks are needed (cond.type=mask) but there is no 'mask' image column "
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
        if isinstance(feature, datasets.ClassLabel):
            check_class_count(len(feature.names), f"{origin}, column {label_column}")
            labels, class_names = np.asarray(table[label_column], dtype=np.int64), list(feature.names)
        else:
            ints, class_names = labels_from_values(list(table[label_column]),
                                                   lambda i: f"{origin}[{i}], column {label_column}")
            labels = np.asarray(ints, dtype=np.int64)
    # rows are read whole: keep only the image columns, undecoded (decoding happens in load_rgb)
    columns = [image_column] + ([mask_column] if mask_column else [])
    undecoded = table.select_columns(columns)
    for column in columns:
        undecoded = undecoded.cast_column(column, datasets.Image(decode=False))
    entries = {column: _image_entries(undecoded, column) for column in columns}
    empty = entries[image_column][0]
    if mask_column is not None:
        no_mask = entries[mask_column][0]
        if no_mask.any():
            first = int(np.flatnonzero(no_mask)[0])
            raise DataError(f"{origin}: row {first} has no mask ({int(no_mask.sum())} row(s) "
                            "without one; masks are needed: cond.type=mask)")
    if empty.all():
        raise DataError(f"{origin}: every row's image is empty")
    skipped = [(f"{origin}[{i}]", "empty image") for i in np.flatnonzero(empty)]
    files = None
    if root is not None:        # rows holding only a path: inside the folder, read from it, scanned as files are
        files = {column: _row_files(root, origin, column, *entries[column][1:]) for column in columns}
        unreadable = np.zeros(n, dtype=bool)
        for column in columns:
            rows = [row for row in files[column] if not empty[row]]
            for row, why in zip(rows, _scan_files([files[column][row] for row in rows])):
                if why is not None and not unreadable[row]:
                    unreadable[row] = True
                    what = "" if column == image_column else f"its {column} "
                    skipped.append((f"{origin}[{row}]", f"{what}{files[column][row]}: {why}"))
        if (empty | unreadable).all():
            raise DataError(f"{origin}: no row's image can be read (e.g. {skipped[0][0]}: {skipped[0][1]})")
        empty = empty | unreadable
    _log_skipped(skipped, origin)
    return Source(
        records=ArrowRecords(undecoded, image_column, mask_column, origin, whole=table, files=files),
        rows=np.flatnonzero(~empty).astype(np.int64),
        labels=labels,
        class_names=class_names,
        skipped_files=[name for name, _ in skipped],
        has_masks=mask_column is not None,
        description=origin,
    )


def _image_entries(table: Any, column: str) -> tuple[np.ndarray, np.ndarray, Any]:
    """Of an undecoded image column (read at the Arrow level): the rows with neither bytes nor a path, the
    rows holding only a path, and the paths."""
    import pyarrow.compute as pc

    values = table.with_format("arrow")[column]
    if hasattr(values, "combine_chunks"):
        values = values.combine_chunks()
    paths = pc.struct_field(values, "path")
    has_bytes = pc.binary_length(pc.struct_field(values, "bytes")).fill_null(0).to_numpy(zero_copy_only=False) > 0
    has_path = pc.utf8_length(paths).fill_null(0).to_numpy(zero_copy_only=False) > 0
    valid = pc.is_valid(values).to_numpy(zero_copy_only=False)
    return ~(valid & (has_bytes | has_path)), valid & ~has_bytes & has_path, paths


def _row_files(root: Path, origin: str, column: str, path_only: np.ndarray, paths: Any) -> dict[int, str]:
    """The file of each row holding only a path: relative paths resolve against the saved folder (never
    the current directory); a path outside it is refused, naming the row."""
    return {int(row): str(path_inside(root, paths[int(row)].as_py(), f"{origin}[{row}], column {column}",
                                      absolute=True))
            for row in np.flatnonzero(path_only)}


def _saved_source(root: Path, cfg: DataConfig, masks: bool) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises several types for damaged folders
        raise DataError(f"{root}: cannot load the save_to_disk data set ({type(e).__name__}: {e})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if cfg.split not in loaded:
            raise DataError(f"{root}: no split '{cfg.split}' (splits: {', '.join(loaded)}); "
                            "set data.split")
        return _arrow_source(loaded[cfg.split], masks, f"{root}:{cfg.split}", root)
    return _arrow_source(loaded, masks, str(root), root)


def _hub_source(name: str, cfg: DataConfig, masks: bool) -> Source:
    import datasets

    try:
        table = datasets.load_dataset(name, split=cfg.split)
    except Exception as e:  # network, authentication, unknown name or split
        raise DataError(f"'{name}' is neither a local folder nor a reachable hub dataset "
                        f"(split '{cfg.split}'): {type(e).__name__}: {e}") from None
    return _arrow_source(table, masks, f"{name}:{cfg.split}")


def open_source(cfg: DataConfig, masks: bool = False) -> Source:
    """The records named by ``cfg.path`` (folder, save_to_disk folder or hub name); ``masks``: pair each image
    with its mask (cond.type=mask)."""
    if not cfg.path:
        raise DataError("no data given: data.path is empty (pass --data FOLDER_OR_NAME)")
    path = Path(cfg.path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DataError(f"{path}: is a file, not a folder of images or a saved data set")
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_source(path, cfg, masks)
        if not any(path.iterdir()):
            raise DataError(f"{path}: the folder is empty")
        return _folder_source(path, masks)
    if looks_like_path(cfg.path):
        raise DataError(f"{path}: no such folder")
    return _hub_source(cfg.path, cfg, masks)
