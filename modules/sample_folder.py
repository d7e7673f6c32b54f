"""A folder of generated samples that many processes fill, and that a rerun completes.

    OUT/000000.png ...        one PNG per image (written atomically)
    OUT/manifest.jsonl        one JSON line per finished image, sorted by index
    OUT/request.json          what the images are (model, sampler, steps, guidance, seed, conditions)
    OUT/.parts/rank_R.jsonl   while a run is going: each process's lines, appended as its PNGs complete

Image i depends only on the request and i, so a rerun of the same request keeps every image
that is listed and decodes, generates only the rest, and ends with the same folder as an
uninterrupted run, whatever the number of processes. A different request in the same folder
is refused unless ``--overwrite``, which first removes the old manifest, so the manifest never
describes images of another request.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
import numpy as np
from PIL import Image

from modules.config_io import diff_fields
from modules.errors import ConfigError

MANIFEST = "manifest.jsonl"
REQUEST = "request.json"
PARTS = ".parts"


def _read_lines(path: Path) -> list[dict]:
    """The JSON lines of ``path``; a torn last line (a kill mid-write) is dropped."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("index"), int) and isinstance(record.get("file"), str):
            records.append(record)
    return records


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

    def open(self, overwrite: bool) -> dict[int, dict]:
        """Claim the folder (main process) and return the finished images {index: record}."""
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
            tmp = self.out / f".{REQUEST}.tmp"
            tmp.write_text(json.dumps(self.request, indent=1) + "\n")
            os.replace(tmp, self.out / REQUEST)
        except (OSError, json.JSONDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"--out {self.out}: cannot use it ({reason})") from None
        return {i: r for i, r in self._listed().items() if _decodes(self.out / r["file"])}

    def _listed(self) -> dict[int, dict]:
        records: dict[int, dict] = {}
        sources = [self.out / MANIFEST, *sorted((self.out / PARTS).glob("rank_*.jsonl"))]
        for path in sources:
            if path.is_file():
                records.update({r["index"]: r for r in _read_lines(path)})
        return records

    def record(self, records: list[dict]) -> None:
        """Append finished images (their PNGs are complete) to this process's part of the manifest."""
        if self._part is None:
            self._part = open(self.out / PARTS / f"rank_{self.rank}.jsonl", "a")
        self._part.writelines(json.dumps(r) + "\n" for r in records)
        self._part.flush()

    def close(self) -> None:
        if self._part is not None:
            self._part.close()
            self._part = None

    def merge(self, count: int) -> list[dict]:
        """Main process, after every process closed its part: one sorted manifest, parts removed."""
        records = self._listed()
        missing = [i for i in range(count) if i not in records]
        if missing:
            raise ConfigError(f"--out {self.out}: {len(missing)} image(s) missing after sampling (e.g. index "
                              f"{missing[0]}); run the same command again to make them")
        ordered = [records[i] for i in range(count)]
        tmp = self.out / f".{MANIFEST}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in ordered))
        os.replace(tmp, self.out / MANIFEST)
        shutil.rmtree(self.out / PARTS, ignore_errors=True)
        return ordered

    def write_npz(self, records: list[dict]) -> Path:
        """All images as one uint8 NHWC array ``arr_0`` (the ADM evaluation suite's format)."""
        arrays = np.stack([np.asarray(Image.open(self.out / r["file"]).convert("RGB")) for r in records])
        path = self.out / "samples.npz"
        tmp = self.out / ".samples.tmp.npz"
        np.savez(tmp, arr_0=arrays)
        os.replace(tmp, path)
        return path
