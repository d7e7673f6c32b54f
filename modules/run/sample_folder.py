"""A folder of generated samples that many processes fill, and that a rerun completes.

    OUT/000000.png ...        one PNG per image (written atomically)
    OUT/manifest.jsonl        one JSON line per finished image, sorted by index
    OUT/request.json          what the images are (model, sampler, steps, guidance scale and interval, seed,
                              conditions)
    OUT/.parts/rank_R.jsonl   while a run is going: each process's lines, appended as its PNGs complete

Image i depends only on the request and i, so a rerun of the same request keeps every image
that is listed and decodes, generates only the rest, and ends with the same folder as an
uninterrupted run, whatever the number of processes. A different request in the same folder
is refused unless ``--overwrite``, which first removes the old manifest (so the manifest never
describes images of another request), then the old images and grid; a damaged ``request.json`` is
another request. A run stopped by a failed
write (a full disk) leaves a manifest of the images finished so far, which ``evaluate.py`` refuses
as incomplete.

The folder keeps its role (issue 21, rule 3): :func:`out_problem` refuses a model folder, a folder
inside one, and a training run's export or checkpoint folder (the next export would delete the
samples), and :meth:`SampleFolder.foreign` a folder holding images that sample.py did not write (a
data set: the next training run would train on the samples), with or without ``--overwrite``. In a
folder sample.py made (it holds ``request.json``) every PNG at the top is its own.
Every file is written through :mod:`modules.durable` (atomic, never through a planted link); the
parts are appended to through a descriptor opened without following links (:func:`open_part`), and
every name read from a manifest is a plain file name in the folder (rule 4).

Memory does not grow with the request's size: the work list is an iterator, records are
streamed to and from the files, and only the indices of finished images are held (8 bytes each).
"""
from __future__ import annotations

import array
import errno
import itertools
import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
from PIL import Image

from modules import durable
from modules.config.io import diff_fields
from modules.data.image_io import find_images, is_image_file
from modules.errors import ConfigError
from modules.run.layout import RUN_OWNED

MANIFEST = "manifest.jsonl"
REQUEST = "request.json"
PARTS = ".parts"


def _plain_name(name) -> bool:
    """A file name directly in the folder: no separator, not '.', '..' or hidden."""
    return isinstance(name, str) and bool(name) and not name.startswith(".") and "/" not in name \
        and "\\" not in name and "\0" not in name


def _read_lines(path: Path) -> Iterator[dict]:
    """The records of ``path``, one line at a time; a torn last line (a kill mid-write) is dropped, and so is
    a record whose file is not a plain name in the folder (``../x``, ``/etc/x``: rule 4)."""
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and type(record.get("index")) is int and _plain_name(record.get("file")):
                yield record


def out_problem(out: Path) -> Optional[str]:
    """Why ``out`` may not hold samples, or None: it is (or is inside) a model folder, or it is (or is
    inside) a folder a training run rewrites (its exports, checkpoints, its copy of the VAE), made yet
    or not. Read-only: asked before the folder is created."""
    out = Path(os.path.abspath(out))
    kind = durable.output_kind(out) if out.is_dir() else None
    if kind not in (None, "samples"):
        return f"--out {out} holds a {kind} output; choose another folder for the samples"
    for folder in (out, *out.parents):
        if folder.is_dir():
            kind = durable.model_folder_kind(folder)
            if kind:
                where = "is" if folder == out else f"is inside {folder}, which is"
                return (f"--out {out} {where} a model folder (config.json of a {kind!r}); samples go elsewhere, and "
                        "the next export would delete them")
        if folder.name in RUN_OWNED and durable.output_kind(folder.parent) == "run":
            return (f"--out {out} is inside {folder}, which the training run in {folder.parent} rewrites (its "
                    f"{folder.name}/); choose a folder of its own, e.g. {folder.parent / 'samples'}")
    return None


def foreign_image(out: Path, is_own: Callable[[Path], bool]) -> Optional[Path]:
    """The first (by name) image file under ``out``, as a data scan sees them (hidden files and output
    folders left out), that ``is_own`` does not accept, or None. The folder is read an entry at a time."""
    first = None
    with os.scandir(out) as entries:
        for entry in entries:
            if entry.name.startswith(".") or (first is not None and entry.name >= first.name):
                continue
            path = Path(entry.path)
            if entry.is_dir():
                if not durable.is_output_folder(path):
                    images = find_images(path)
                    first = images[0] if images else first
            elif is_image_file(path) and entry.is_file() and not is_own(path):
                first = path
    return first


def open_part(path: Path):
    """``path`` opened for appending, created if missing, never through a link: a link planted under its
    name (or its folder's) is refused by the kernel (O_NOFOLLOW) and replaced by a file of our own."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
        try:
            fd = os.open(path.name, flags, 0o644, dir_fd=dir_fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            os.unlink(path.name, dir_fd=dir_fd)
            fd = os.open(path.name, flags | os.O_EXCL, 0o644, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    return os.fdopen(fd, "a")


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def pending(count: int, finished: np.ndarray, rank: int = 0, world: int = 1) -> Iterator[int]:
    """The indices below ``count`` not in ``finished`` (sorted), in order, every ``world``-th from
    ``rank``: one process's share of the work, made lazily."""
    def missing() -> Iterator[int]:
        j = 0
        for i in range(count):
            while j < len(finished) and finished[j] < i:
                j += 1
            if j == len(finished) or finished[j] != i:
                yield i
    return itertools.islice(missing(), rank, None, world)


def batches(indices: Iterable[int], size: int) -> Iterator[list[int]]:
    it = iter(indices)
    return iter(lambda: list(itertools.islice(it, size)), [])


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:  # PIL raises many types for damaged files
        return False


class SampleFolder:
    """The output folder of one sampling request (see the module docstring)."""

    def __init__(self, out: Path, request: dict, rank: int):
        self.out = Path(out)
        self.request = request
        self.rank = rank
        self._part = None

    def open(self, overwrite: bool, file_of: Optional[Callable[[int], str]] = None) -> np.ndarray:
        """Take the folder (main process, under the lock of ``durable.claim_output``) and return the indices
        of the finished images, sorted: listed (under the name ``file_of`` gives them, when given), and
        their PNG decodes."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            if (self.out / PARTS).is_symlink() or (self.out / PARTS).is_file():
                durable.clear(self.out / PARTS)      # a planted link or file: never written through
            saved_path = self.out / REQUEST
            ours = saved_path.is_file() or saved_path.is_symlink()
            foreign = self.foreign()
            if foreign:
                raise ConfigError(foreign)
            problem = self._other_request(saved_path) if ours else (
                "images that are not from sample.py's current format"
                if (self.out / MANIFEST).is_file() else None)
            if problem and not overwrite:
                raise ConfigError(f"--out {self.out} already holds {problem}; pass --overwrite or choose another "
                                  "folder (the same command again continues an interrupted run)")
            if overwrite:
                own = self._is_own(ours)
                # The manifest goes first: a kill from here on never leaves it listing images of another request.
                for name in (MANIFEST, "samples.npz"):
                    if (self.out / name).is_symlink() or (self.out / name).is_file():
                        (self.out / name).unlink()
                durable.clear(self.out / PARTS)
                with os.scandir(self.out) as entries:      # the old request's images and grid
                    for entry in entries:
                        path = Path(entry.path)
                        if is_image_file(path) and (entry.is_symlink() or entry.is_file()) and own(path):
                            path.unlink()
            (self.out / PARTS).mkdir(exist_ok=True)
            durable.write_json(self.out / REQUEST, self.request)
        except OSError as e:
            raise ConfigError(f"--out {self.out}: cannot use it ({durable.write_failure(e)})") from None
        return self._indices(lambda r: (file_of is None or r["file"] == file_of(r["index"]))
                             and _decodes(self.out / r["file"]))

    def foreign(self) -> Optional[str]:
        """Why the folder is not sample.py's to write: it holds images sample.py did not write there (a data
        folder: the next training run would train on the samples), or None. Asked before the folder is
        claimed (nothing is written into a data folder, not even the claim's marker) and again under
        the claim."""
        if not self.out.is_dir():
            return None
        saved_path = self.out / REQUEST
        foreign = foreign_image(self.out, self._is_own(saved_path.is_file() or saved_path.is_symlink()))
        if foreign is None:
            return None
        return (f"--out {self.out} holds images that sample.py did not write there (e.g. "
                f"{foreign.relative_to(self.out)}): a data folder? Choose an empty or new folder (--overwrite "
                "replaces only sample.py's own files)")

    def _is_own(self, sample_folder: bool) -> Callable[[Path], bool]:
        """Which image files in the folder sample.py wrote: in a folder it made (its request.json), every PNG
        at the top (images, a grid; an image whose line a kill cut off included); elsewhere, the PNGs a
        manifest of an earlier format lists."""
        if sample_folder:
            return lambda path: path.parent == self.out and path.suffix == ".png"
        listed = set()
        for path in [self.out / MANIFEST, *sorted((self.out / PARTS).glob("rank_*.jsonl"))]:
            if path.is_file() and not path.is_symlink():
                listed.update(r["file"] for r in _read_lines(path) if r["file"].endswith(".png"))
        return lambda path: path.parent == self.out and path.name in listed

    def _other_request(self, saved_path: Path) -> Optional[str]:
        """What the folder's request.json says that this request does not, or None (the same request). A
        damaged one (unreadable, not UTF-8, invalid or too deeply nested JSON, not an object) is another
        request."""
        try:
            saved = durable.read_json(saved_path)
        except ValueError as e:
            return f"a damaged {REQUEST} ({_short(str(e))})"
        if not isinstance(saved, dict):
            return f"a damaged {REQUEST} (a JSON {type(saved).__name__}, not an object)"
        if saved == self.request:
            return None
        try:
            changes = diff_fields(saved, self.request)[:3]
        except RecursionError:
            changes = ["nested too deeply"]
        return f"images of another request ({REQUEST}: {_short('; '.join(changes) or 'another format', 300)})"

    def listed(self) -> np.ndarray:
        """The sorted indices of the images the manifest and the running parts list."""
        return self._indices(lambda r: True)

    def _indices(self, keep: Callable[[dict], bool]) -> np.ndarray:
        count, found = self.request["count"], array.array("q")
        for path in [self.out / MANIFEST, *sorted((self.out / PARTS).glob("rank_*.jsonl"))]:
            if path.is_file() and not path.is_symlink():
                found.extend(r["index"] for r in _read_lines(path) if 0 <= r["index"] < count and keep(r))
        return np.unique(np.frombuffer(found, dtype=np.int64))

    def record(self, record: dict) -> None:
        """Append a finished image (its PNG is complete) to this process's part of the manifest."""
        if self._part is None:
            self._part = open_part(self.out / PARTS / f"rank_{self.rank}.jsonl")
        self._part.write(json.dumps(record) + "\n")
        self._part.flush()

    def close(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None

    def write_manifest(self, indices: Iterable[int], make_record: Callable[[int], dict]) -> None:
        """``manifest.jsonl`` (atomically) of the images ``indices``, their records made by ``make_record``."""
        def write(tmp: Path) -> None:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(make_record(int(i))) + "\n" for i in indices)
        durable.write_file(self.out / MANIFEST, write)

    def merge(self, make_record: Callable[[int], dict]) -> None:
        """Main process, after every process closed its part: one sorted manifest, parts removed."""
        count = self.request["count"]
        finished = self.listed()
        if len(finished) < count:
            raise ConfigError(f"--out {self.out}: {count - len(finished)} image(s) missing after sampling (e.g. index "
                              f"{next(pending(count, finished))}); run the same command again to make them")
        self.write_manifest(range(count), make_record)
        durable.clear(self.out / PARTS)

    def write_npz(self, file_of: Callable[[int], str]) -> Path:
        """Every image (``file_of(i)`` for i below the request's count) as one uint8 NHWC array
        ``arr_0`` (the ADM evaluation suite's format), streamed into the archive one image at a time."""
        count = self.request["count"]
        first = np.asarray(Image.open(self.out / file_of(0)).convert("RGB"))
        header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
                  "shape": (count, *first.shape)}
        def write(tmp: Path) -> None:
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive, \
                    archive.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for i in range(count):
                    with Image.open(self.out / file_of(i)) as img:
                        f.write(np.asarray(img.convert("RGB"), dtype=first.dtype).tobytes())
        return durable.write_file(self.out / "samples.npz", write)
