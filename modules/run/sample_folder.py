"""A folder of generated samples that many processes fill, and that a rerun completes.

    OUT/000000.png ...        one PNG per image (written atomically)
    OUT/manifest.jsonl        one JSON line per finished image, sorted by index
    OUT/request.json          what the images are (model, sampler, steps, guidance, seed, conditions)
    OUT/.parts/rank_R.jsonl   while a run is going: each process's lines, appended as its PNGs complete

Image i depends only on the request and i, so a rerun of the same request keeps every image
that is listed and decodes, generates only the rest, and ends with the same folder as an
uninterrupted run, whatever the number of processes. A different request in the same folder
is refused unless ``--overwrite``, which first removes the old manifest, so the manifest never
describes images of another request. A run stopped by a failed write (a full disk) leaves a
manifest of the images finished so far, which ``evaluate.py`` refuses as incomplete.

Memory does not grow with the request's size: the work list is an iterator, records are
streamed to and from the files, and only the indices of finished images are held (8 bytes each).
"""
from __future__ import annotations

import array
import itertools
import json
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image

from modules import durable
from modules.config.io import diff_fields
from modules.errors import ConfigError

MANIFEST = "manifest.jsonl"
REQUEST = "request.json"
PARTS = ".parts"


def _read_lines(path: Path) -> Iterator[dict]:
    """The records of ``path``, one line at a time; a torn last line (a kill mid-write) is dropped."""
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("index"), int) and isinstance(record.get("file"), str):
                yield record


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

    def open(self, overwrite: bool) -> np.ndarray:
        """Claim the folder (main process) and return the indices of the finished images, sorted:
        listed, and their PNG decodes."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            saved_path = self.out / REQUEST
            saved = json.loads(saved_path.read_text()) if saved_path.is_file() else None
            others = saved is None and any(p.suffix == ".png" or p.name == MANIFEST for p in self.out.iterdir())
            if (saved is not None and saved != self.request) or others:
                if not overwrite:
                    what = (f"images of another request ({'; '.join(diff_fields(saved, self.request)[:3])})"
                            if saved is not None else "images that are not from sample.py's current format")
                    raise ConfigError(f"--out {self.out} already holds {what}; pass --overwrite or choose another "
                                      "folder (the same command again continues an interrupted run)")
                overwrite_done = True
            else:
                overwrite_done = overwrite
            if overwrite_done:
                for name in (MANIFEST, REQUEST, "grid.png", "samples.npz"):
                    (self.out / name).unlink(missing_ok=True)
                shutil.rmtree(self.out / PARTS, ignore_errors=True)
            (self.out / PARTS).mkdir(exist_ok=True)
            durable.write_json(self.out / REQUEST, self.request)
        except (OSError, json.JSONDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"--out {self.out}: cannot use it ({reason})") from None
        return self._indices(lambda r: _decodes(self.out / r["file"]))

    def listed(self) -> np.ndarray:
        """The sorted indices of the images the manifest and the running parts list."""
        return self._indices(lambda r: True)

    def _indices(self, keep: Callable[[dict], bool]) -> np.ndarray:
        count, found = self.request["count"], array.array("q")
        for path in [self.out / MANIFEST, *sorted((self.out / PARTS).glob("rank_*.jsonl"))]:
            if path.is_file():
                found.extend(r["index"] for r in _read_lines(path) if 0 <= r["index"] < count and keep(r))
        return np.unique(np.frombuffer(found, dtype=np.int64))

    def record(self, record: dict) -> None:
        """Append a finished image (its PNG is complete) to this process's part of the manifest."""
        if self._part is None:
            self._part = open(self.out / PARTS / f"rank_{self.rank}.jsonl", "a")
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
        shutil.rmtree(self.out / PARTS, ignore_errors=True)

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
