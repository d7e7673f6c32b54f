"""The latent store: a data set encoded once by a frozen VAE, as the training set of stage 2.

    STORE/index.json                  what the store is (format, VAE identity, encoder settings, the
                                      source's fingerprint and class names) and each shard's rows, files,
                                      sizes and hashes; written last
    STORE/shard_00000/mean.npy ...    one folder per shard of ``shard_rows`` rows: flat arrays, read
                                      memory-mapped (posterior mean and std in float16, and of the
                                      horizontal flip; label; source row; mask; caption embeddings)
    STORE/shard_00000/rows.json       per row: its source key (file name) and caption
    STORE/shard_00000/shard.json      the shard's rows and its files' sizes and hashes; written last

Each image is stored as its posterior mean and std, so training draws a fresh latent sample every
step without running the encoder; a text-conditioned store also holds each caption's token
embeddings and the empty prompt's (``null_text.npy``), so training never runs the text encoder.

**Encoding** (:func:`encode`) is shared by all processes: process r encodes the shards k = r, r + w,
r + 2w, ... straight to disk (each shard written in a temporary folder through preallocated
memory-mapped arrays, then renamed), so memory stays one batch whatever the data set's size; a
shard already complete is kept, so a killed encode resumes at the first unfinished shard, with any
number of processes. No process waits on a collective while others encode: each waits for the
others' shards on the file system, then the main process writes the index.

**Identity** (rule 1 of RELIABILITY.md): a store is named by the fingerprint of everything it is
derived from (the VAE's identity, the image size, the flip setting, the masks and text settings, the
source's fingerprint: its files, labels, captions and masks); a store of other inputs is another
store. **Start-up** does not grow with the data: opening a store reads the index and checks every
shard's files' sizes and array headers; the full content check (every file's hash) is
``python -m modules.data.latent_store verify STORE``, run once after a build.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from modules import durable
from modules.data.order import held_out as held_out_positions
from modules.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)

FORMAT = 3
INDEX = "index.json"
ROWS = "rows.json"
SHARD_MANIFEST = "shard.json"
NULL_TEXT = "null_text.npy"
SHARD_ROWS = 4096
STORE_NAME = re.compile(r"store_[0-9a-f]{16}")
WAIT_S = 2.0                          # how often a process looks for the other processes' shards


@dataclass
class StoreSpec:
    """What a store is derived from (its identity) and what its rows hold."""
    vae: str                  # the VAE's identity (modules.run.export.vae_identity)
    source: str               # the source's fingerprint: files, labels, captions, masks
    image_size: int
    hflip: bool               # also the latents of each image's horizontal flip
    masks: bool               # each row's mask (cond.type=mask)
    text: Optional[str]       # "identity:layer" of the text encoder whose caption embeddings are held
    num_rows: int
    class_names: tuple[str, ...] = ()

    def name(self) -> str:
        return f"store_{durable.fingerprint(asdict(self))[:16]}"

    def inputs_key(self) -> str:
        """What each shard records of its store: the inputs, without the counts a stream learns as it is read."""
        return durable.fingerprint({k: v for k, v in asdict(self).items() if k not in ("num_rows", "class_names")})


# ----------------------------------------------------------------------------- encoding

def shard_name(k: int) -> str:
    return f"shard_{k:05d}"


def shard_ranges(num_rows: int, shard_rows: int) -> list[range]:
    return [range(start, min(start + shard_rows, num_rows)) for start in range(0, num_rows, shard_rows)]


def shard_problem(folder: Path, inputs: Optional[str] = None) -> Optional[str]:
    """Why a shard folder is not a complete shard (of the store of ``inputs``, when given): its manifest
    unreadable, a file missing or of another size, an array not of its row count, or None."""
    try:
        record = durable.read_json(folder / SHARD_MANIFEST)
    except ValueError as e:
        return f"no readable {SHARD_MANIFEST} ({e})"
    if not isinstance(record, dict) or not isinstance(record.get("rows"), int):
        return f"{SHARD_MANIFEST} holds no row count"
    if inputs is not None and record.get("inputs") != inputs:
        return "encoded from other inputs"
    return durable.manifest_problem(folder, record.get("files")) or _arrays_problem(folder, record["files"],
                                                                                    record["rows"])


def _arrays_problem(folder: Path, files: dict, rows: int) -> Optional[str]:
    """Why the ``.npy`` arrays among a shard's listed ``files`` do not hold ``rows`` rows each, or None (their
    headers only)."""
    for name in files:
        if name.endswith(".npy"):
            try:
                held = np.load(folder / name, mmap_mode="r").shape[0]
            except (ValueError, OSError) as e:
                return f"{name} is not a readable array: {str(e).splitlines()[0][:120]}"
            if held != rows:
                return f"{name} holds {held} rows, its manifest says {rows}"
    return None


class ShardWriter:
    """Rows appended batch by batch to one shard's arrays, in O(batch) memory: each array's rows go to a
    raw file, and :meth:`close` writes every ``.npy`` (header, then the raw rows copied in blocks), the
    rows' records and, last, the shard's manifest, then renames the shard into place."""

    def __init__(self, out: Path, inputs: str):
        self.out, self.inputs = out, inputs
        self.tmp = durable.fresh_folder(out.with_name(out.name + ".tmp"))
        self.columns: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
        self.files: dict[str, object] = {}
        self.records: list[dict] = []

    def append(self, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        known = self.columns.setdefault(name, (values.dtype, values.shape[1:]))
        if known != (values.dtype, values.shape[1:]):
            raise ValueError(f"shard column {name}: rows of {values.dtype} {values.shape[1:]} after {known}")
        if name not in self.files:
            self.files[name] = open(self.tmp / f"{name}.raw", "xb")
        self.files[name].write(values.tobytes())

    def close(self) -> None:
        rows = len(self.records)
        for name, f in self.files.items():
            f.close()
            dtype, shape = self.columns[name]
            raw = self.tmp / f"{name}.raw"
            with open(self.tmp / f"{name}.npy", "xb") as out, open(raw, "rb") as source:
                np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                           "fortran_order": False, "shape": (rows, *shape)})
                shutil.copyfileobj(source, out, 1 << 22)
            raw.unlink()
        self.files.clear()
        durable.write_json(self.tmp / ROWS, self.records)
        labels = [r["label"] for r in self.records]
        durable.write_json(self.tmp / SHARD_MANIFEST, {"rows": rows, "max_label": max(labels, default=-1),
                                                       "inputs": self.inputs, "files": durable.manifest(self.tmp)})
        durable.publish_folder(self.tmp, self.out, sync=True)

    def abandon(self) -> None:
        for f in self.files.values():
            f.close()
        durable.clear(self.tmp)


@torch.no_grad()
def _encode_batches(vae, batches: Iterator[list[dict]], writer: ShardWriter, spec: StoreSpec, device,
                    text_encoder=None) -> None:
    """Encode item batches (dicts with image, label, key and, as the spec asks, mask and caption) into ``writer``."""
    for items in batches:
        images = torch.stack([it["image"] for it in items]).to(device)
        parts = {"": vae.encode(images)}
        if spec.hflip:
            parts["_flip"] = vae.encode(torch.flip(images, dims=[3]))
        for suffix, posterior in parts.items():
            for name, value in (("mean", posterior.mean), ("std", posterior.std)):
                writer.append(name + suffix, value.float().cpu().numpy().astype(np.float16))
        writer.append("label", np.asarray([int(it["label"]) for it in items], dtype=np.int64))
        writer.append("source_row", np.asarray([int(it["index"]) for it in items], dtype=np.int64))
        if spec.masks:
            writer.append("mask", np.stack([(it["mask"][0].numpy() > 0.5).astype(np.uint8) for it in items]))
        captions = [it.get("caption", "") for it in items]
        if text_encoder is not None:
            writer.append("text", text_encoder.encode_unique(captions).half().cpu().numpy())
            writer.append("truncated", np.asarray(text_encoder.too_long(captions), dtype=np.uint8))
        writer.records += [{"key": it["key"], "caption": caption, "label": int(it["label"]),
                            "substituted": int(it.get("substituted", 0))} for it, caption in zip(items, captions)]


class _Rows(torch.utils.data.Dataset):
    """Items ``rows`` of an image data set, unaugmented, with their source key, for a loader's workers."""

    def __init__(self, dataset, rows: range):
        self.dataset, self.rows = dataset, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[self.rows[i]]
        item["key"] = self.dataset.key(self.rows[i])
        return item


# ----------------------------------------------------------------------------- what a run trains on

def text_key(text_encoder) -> Optional[str]:
    """What a store records of the text encoder whose caption embeddings it holds (None: no captions)."""
    return f"{text_encoder.identity}:{text_encoder.layer}" if text_encoder is not None else None


def spec_of(dataset, vae_id: str, image_size: int, hflip: bool, masks: bool, text_encoder=None) -> StoreSpec:
    """The spec of the store of an image data set: keyed by its files, labels, captions and masks."""
    source = durable.fingerprint({"files": dataset.fingerprint(), "labels": dataset.labels.tolist()})
    return StoreSpec(vae=vae_id, source=source, image_size=image_size, hflip=hflip, masks=masks,
                     text=text_key(text_encoder), num_rows=len(dataset), class_names=tuple(dataset.class_names))


def open_or_encode(vae, dataset, spec: StoreSpec, root: Path, batch_size: int, device, rank: int = 0, world: int = 1,
                   text_encoder=None, num_workers: int = 0, shard_rows: int = SHARD_ROWS) -> "LatentStore":
    """The store of ``spec`` under ``root`` (a run's automatic store), encoded first when it is missing or
    damaged (all processes help); a valid store is opened without a lock or a write."""
    folder = root / spec.name()
    problem = store_problem(folder) if folder.exists() else None
    if folder.exists() and problem is None:
        logger.info("using latent store %s", folder)
    else:
        if rank == 0:
            earlier = sorted(root.glob("latents_*")) if root.is_dir() else []
            logger.info("encoding latent store %s (%s)%s", folder, problem or _nearest_other_store(root, spec),
                        f"; {len(earlier)} latent cache(s) of the earlier format in {root} are not read (remove "
                        f"them: rm -r {root}/latents_*)" if earlier else "")
        if problem and (folder / INDEX).is_file() and rank == 0:
            durable.clear(folder / INDEX)       # damaged: a shard that fails its own manifest is encoded again
        try:
            durable.claim_output(root, "latent_cache", ".lock").release()
        except CheckpointError:
            pass    # another run holds the root's lock: shards have their own locks
        encode(vae, IndexedShards(dataset, shard_rows, batch_size, num_workers), spec, folder, device, rank, world,
               text_encoder)
    return LatentStore(folder, spec.hflip)


def _nearest_other_store(root: Path, spec: StoreSpec) -> str:
    """Why no store fits ``spec``, named by the store beside it that differs least: changed data then reads as
    such, not as a first run."""
    wanted, nearest = asdict(spec), None
    for index_path in sorted(root.glob(f"store_*/{INDEX}")) if root.is_dir() else []:
        try:
            saved = read_index(index_path.parent)["spec"]
        except DataError:
            continue
        changed = sorted(k for k in wanted if k not in ("num_rows", "class_names")     # they follow from the source
                         and _normal(saved.get(k)) != _normal(wanted[k]))
        if nearest is None or len(changed) < len(nearest[2]):
            nearest = (index_path.parent.name, saved, changed)
    if nearest is None:
        return f"none for images of fingerprint {spec.source[:12]} with this VAE and settings yet"
    name, saved, changed = nearest
    if changed == ["source"]:
        return (f"none for these images yet: their fingerprint {spec.source[:12]} differs from "
                f"{str(saved.get('source'))[:12]} of store {name} (same VAE and settings), so the data changed or "
                "is another data set (its files, labels, captions or masks)")
    return f"none for these settings yet (the nearest, {name}, differs in: {', '.join(changed)})"


def claim_store_folder(folder: Path, spec: StoreSpec) -> None:
    """Take ``folder`` for the store of ``spec`` (main process, before an explicit encode): an output folder of
    its own (no data scan reads it), refused when it holds a finished store of other inputs."""
    durable.claim_output(folder, "latent_cache", ".lock").release()
    if (folder / INDEX).is_file():
        index = read_index(folder)
        saved = StoreSpec(**{**index["spec"], "class_names": tuple(index["spec"]["class_names"])})
        if saved.inputs_key() != spec.inputs_key():
            same_counts = StoreSpec(**{**asdict(spec), "num_rows": saved.num_rows, "class_names": saved.class_names})
            raise DataError(f"{folder} holds a latent store of other inputs ({spec_problem(index, same_counts)}); "
                            "choose another --out, or remove it (python -m modules.data.latent_store remove)")


def open_store(folder: Path, spec: StoreSpec) -> "LatentStore":
    """An explicit store (``--data STORE``), refused in one line when it was made from other inputs than
    ``spec`` asks for (its ``source`` and ``num_rows``, unknown without the images, are taken as they are)."""
    store = LatentStore(folder, spec.hflip)
    wanted = StoreSpec(**{**asdict(spec), "source": store.spec.source, "num_rows": store.spec.num_rows,
                          "class_names": store.spec.class_names})
    problem = spec_problem(store.index, wanted)
    if problem:
        raise DataError(f"latent store {folder}: {problem}: encode the data again for this run (encode.py) or "
                        "train with the settings it was made with")
    return store


class IndexedShards:
    """An image data set (modules/data/dataset.py) cut into shards of ``shard_rows`` rows, each read by a
    loader (``num_workers`` decode in parallel)."""

    def __init__(self, dataset, shard_rows: int = SHARD_ROWS, batch_size: int = 32, num_workers: int = 0):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.ranges = shard_ranges(len(dataset), shard_rows)

    @property
    def n_shards(self) -> int:
        return len(self.ranges)

    def batches(self, k: int) -> Iterator[list[dict]]:
        loader = torch.utils.data.DataLoader(_Rows(self.dataset, self.ranges[k]), batch_size=self.batch_size,
                                             num_workers=self.num_workers, collate_fn=list)
        return iter(loader)


class StreamShards:
    """A stream (modules/data/streams.py: tar shards, a streamed hub data set): one store shard per input shard."""

    def __init__(self, source, batch_size: int = 32):
        self.source, self.batch_size = source, batch_size

    @property
    def n_shards(self) -> int:
        return self.source.n_shards

    def batches(self, k: int) -> Iterator[list[dict]]:
        items = self.source.items(k)
        while True:
            batch = list(itertools.islice(items, self.batch_size))
            if not batch:
                return
            yield batch


def encode(vae, shards, spec: StoreSpec, folder: Path, device, rank: int = 0, world: int = 1,
           text_encoder=None) -> Path:
    """Encode ``shards`` (:class:`IndexedShards` or :class:`StreamShards`) into the store ``folder`` (see the
    module docstring); every process calls it with its ``rank`` of ``world``. Returns ``folder`` once its
    index is written."""
    with durable.failed_write_is(f"the latent store {folder}", "nothing was encoded yet"):
        folder.mkdir(parents=True, exist_ok=True)
    n, inputs = shards.n_shards, spec.inputs_key()

    def complete(k: int) -> bool:
        return shard_problem(folder / shard_name(k), inputs) is None

    done = sum(complete(k) for k in range(n))
    if done and rank == 0:
        logger.info("latent store %s: %d of %d shards already encoded; encoding the rest", folder, done, n)
    with durable.failed_write_is(f"the latent store {folder}", "its complete shards are kept, and the same command "
                                 "continues the encode once there is room"):
        _encode_shards(vae, shards, spec, folder, device, rank, world, text_encoder, complete)
    _wait_for(lambda: all(complete(k) for k in range(n)))
    if rank == 0:
        with durable.failed_write_is(f"the index of the latent store {folder}", "its shards are kept"):
            if text_encoder is not None:
                null = text_encoder.null().half().cpu().numpy()
                durable.write_file(folder / NULL_TEXT, lambda tmp: _save_array(tmp, null))
            write_index(folder, spec, n)
    _wait_for(lambda: (folder / INDEX).is_file())
    return folder


def _encode_shards(vae, shards, spec: StoreSpec, folder: Path, device, rank: int, world: int, text_encoder,
                   complete: Callable[[int], bool]) -> None:
    """This process's part of :func:`encode`: its shards, then any other nobody holds."""
    n, inputs = shards.n_shards, spec.inputs_key()
    try:
        # This process's shards first, then any other that nobody holds: several processes, or several runs
        # building the same store, share the work; a shard's lock makes one of them its only writer.
        for k in [k for k in range(rank, n, world)] + [k for k in range(n) if k % world != rank]:
            out = folder / shard_name(k)
            if complete(k):
                continue
            lock = durable.Lock(folder / f".{out.name}.lock")
            problem = lock.acquire(wait=False)
            if problem is not None and problem.startswith("in use"):
                continue            # another process is encoding it
            if problem is not None:
                raise CheckpointError(f"latent store {folder}: {problem}")
            try:
                if not complete(k):
                    writer = ShardWriter(out, inputs)
                    try:
                        _encode_batches(vae, shards.batches(k), writer, spec, device, text_encoder)
                    except BaseException:
                        writer.abandon()
                        raise
                    writer.close()
                    logger.info("latent store %s: shard %d of %d encoded", folder.name, k + 1, n)
            finally:
                lock.release()
    except KeyboardInterrupt:
        finished = sum(complete(k) for k in range(n))
        raise CheckpointError(f"interrupted while encoding the latent store {folder}: {finished} of {n} shards are "
                              "complete and kept; the same command continues from there") from None


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:     # a file, not a name: np.save would add ".npy" to a temporary's name
        np.save(f, array)


def _wait_for(ready: Callable[[], bool]) -> None:
    """Poll the file system until ``ready()`` (no collective: a slow peer cannot time a barrier out)."""
    while not ready():
        time.sleep(WAIT_S)


def write_index(folder: Path, spec: StoreSpec, num_shards: int) -> None:
    """The store's index (written last): its spec and each shard's rows and files (size and checksum)."""
    shards, max_label = [], -1
    for k in range(num_shards):
        record = durable.read_json(folder / shard_name(k) / SHARD_MANIFEST)
        shards.append({"name": shard_name(k), "rows": record["rows"], "files": record["files"]})
        max_label = max(max_label, record.get("max_label", -1))
    rows = sum(s["rows"] for s in shards)
    if spec.num_rows != rows or (not spec.class_names and max_label >= 0):    # a stream: counted as it was read
        spec = StoreSpec(**{**asdict(spec), "num_rows": rows,
                            "class_names": spec.class_names or tuple(str(i) for i in range(max_label + 1))})
    extra = {NULL_TEXT: durable.file_entry(folder / NULL_TEXT)} if (folder / NULL_TEXT).is_file() else {}
    durable.write_json(folder / INDEX, {"format": FORMAT, "spec": asdict(spec), "shards": shards, "files": extra,
                                        "built": time.strftime("%Y-%m-%d %H:%M:%S")}, sync=True)


# ----------------------------------------------------------------------------- checking

def read_index(folder: Path) -> dict:
    """A store's index; an unreadable or foreign one is a DataError naming the folder."""
    try:
        index = durable.read_json(folder / INDEX)
    except ValueError as e:
        raise DataError(f"latent store {folder}: unreadable {INDEX} ({e})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("spec"), dict) \
            or not isinstance(index.get("shards"), list):
        raise DataError(f"latent store {folder}: {INDEX} is not a latent store index of format {FORMAT}")
    return index


def store_problem(folder: Path, deep: bool = False) -> Optional[str]:
    """Why ``folder`` is not a complete store, or None. Cheap (every shard's files' sizes and the arrays'
    headers) unless ``deep`` (every file's checksum too)."""
    if not (folder / INDEX).is_file():
        return "incomplete store (no index.json: the encode did not finish)"
    try:
        index = read_index(folder)
    except DataError as e:
        return str(e)
    for shard in index["shards"]:
        if not isinstance(shard, dict):
            return f"damaged store ({INDEX} lists a shard as {shard!r})"
        path, rows = folder / str(shard.get("name")), shard.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool):
            return f"damaged store ({INDEX} gives shard {path.name} no row count)"
        # the index holds each shard's file list and row count: its shard.json need not be read again
        problem = (durable.manifest_problem(path, shard.get("files"), deep=deep)
                   or _arrays_problem(path, shard["files"], rows))
        if problem:
            return f"damaged store (shard {path.name}: {problem})"
    return durable.manifest_problem(folder, index.get("files", {}), deep=deep)


def spec_problem(index: dict, spec: StoreSpec) -> Optional[str]:
    """Why a store of ``index`` is not the one ``spec`` asks for, or None (names the settings that differ)."""
    saved, wanted = index["spec"], asdict(spec)
    changed = sorted(k for k in wanted if _normal(saved.get(k)) != _normal(wanted[k]))
    return f"it was made from other inputs (changed: {', '.join(changed)})" if changed else None


def _normal(value):
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------- reading

class LatentStore(torch.utils.data.Dataset):
    """A store as a data set: item ``index`` or ``(index, aug_seed)`` (the flipped copy chosen by
    ``aug_seed``), and whole batches at once (``__getitems__``, what the loader calls): memory-mapped
    arrays, read by fancy indexing, so a batch costs microseconds per row."""

    def __init__(self, folder: Path, hflip: bool = True):
        self.folder = Path(folder)
        problem = store_problem(self.folder)
        if problem:
            raise DataError(f"latent store {self.folder}: {problem}; encode it again (the same command continues "
                            "an interrupted encode)")
        self.index = read_index(self.folder)
        self.spec = StoreSpec(**{**self.index["spec"], "class_names": tuple(self.index["spec"]["class_names"])})
        self.hflip = hflip and self.spec.hflip
        self.shards = [self.folder / s["name"] for s in self.index["shards"]]
        counts = [s["rows"] for s in self.index["shards"]]
        self.starts = np.cumsum([0] + counts)
        self.rows = np.arange(self.starts[-1])
        self._arrays: dict[tuple[int, str], np.ndarray] = {}
        self._records: dict[int, list] = {}
        self.has_masks = self.spec.masks
        self.has_text = self.spec.text is not None
        null = self.folder / NULL_TEXT
        self.null_text = torch.from_numpy(np.load(null).astype(np.float32)) if self.has_text else None

    # -- facts
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_classes(self) -> int:
        return len(self.spec.class_names)

    def fingerprint(self) -> str:
        """The source's fingerprint when the store was encoded (what a resumed run compares)."""
        return self.spec.source

    def truncated_captions(self) -> int:
        """How many captions were longer than the text encoder's context (truncated when encoded)."""
        return sum(int(self._array(s, "truncated").sum()) for s in range(len(self.shards))) if self.has_text else 0

    def split(self, held_out: int) -> tuple["LatentStore", "LatentStore"]:
        """(training view, validation view): ``held_out`` rows spread evenly over the store."""
        import copy
        total = len(self)
        if not 0 < held_out < total:
            raise DataError(f"eval.val_images={held_out}: must be between 1 and the {total - 1} the store can spare")
        held = held_out_positions(total, held_out)
        views = []
        for rows in (np.setdiff1d(self.rows, self.rows[held]), self.rows[held]):
            view = copy.copy(self)
            view.rows = rows
            views.append(view)
        return views[0], views[1]

    # -- rows
    def _array(self, shard: int, name: str) -> np.ndarray:
        key = (shard, name)
        if key not in self._arrays:
            self._arrays[key] = np.load(self.shards[shard] / f"{name}.npy", mmap_mode="r")
        return self._arrays[key]

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard = np.searchsorted(self.starts, rows, side="right") - 1
        return shard, rows - self.starts[shard]

    def caption(self, index: int) -> str:
        shard, offset = self._locate(np.asarray([self.rows[int(index)]]))
        if int(shard[0]) not in self._records:
            self._records[int(shard[0])] = json.loads((self.shards[int(shard[0])] / ROWS).read_text())
        return self._records[int(shard[0])][int(offset[0])]["caption"]

    def __getitem__(self, key) -> dict:
        """One item: what ``__getitems__`` gives for a batch of one."""
        return {name: values[0] for name, values in self.__getitems__([key]).items()}

    def __getitems__(self, keys: Sequence) -> dict[str, torch.Tensor]:
        """A batch of items as one dict of stacked tensors (mean, std, label, index; mask, text): each shard's
        rows read at once from its memory-mapped arrays, the flipped rows from the flip's arrays."""
        index = np.fromiter((k[0] if isinstance(k, (tuple, list)) else k for k in keys), dtype=np.int64, count=len(keys))
        flips = np.fromiter((self.hflip and isinstance(k, (tuple, list)) and random.Random(k[1]).random() < 0.5
                             for k in keys), dtype=bool, count=len(keys))
        shard, offset = self._locate(self.rows[index])
        names = ["mean", "std", "label", "source_row"] + (["mask"] if self.has_masks else []) + \
                (["text"] if self.has_text else [])
        out: dict[str, np.ndarray] = {}
        for s in np.unique(shard):
            for flipped in (False, True):
                at = np.flatnonzero((shard == s) & (flips == flipped))
                if not len(at):
                    continue
                rows = offset[at]
                for name in names:
                    source = name + "_flip" if flipped and name in ("mean", "std") else name
                    values = self._array(int(s), source)[rows]
                    if name == "mask" and flipped:
                        values = values[:, :, ::-1]
                    if name not in out:
                        # posteriors widen to float32 as they are copied in: exact, one pass, and free of torch's
                        # intra-op threads, which contend with the loader's
                        out[name] = np.empty((len(keys), *values.shape[1:]),
                                             dtype=np.float32 if name in ("mean", "std") else values.dtype)
                    out[name][at] = values
        batch = {"mean": torch.from_numpy(out["mean"]), "std": torch.from_numpy(out["std"]),
                 "label": torch.from_numpy(out["label"]), "index": torch.from_numpy(out["source_row"]),
                 "substituted": torch.zeros(len(keys), dtype=torch.int64)}
        if self.has_masks:
            batch["mask"] = torch.from_numpy(out["mask"]).float()[:, None]
        if self.has_text:
            batch["text"] = torch.from_numpy(out["text"]).float()
        return batch


def is_store(path: Path) -> bool:
    """Whether ``path`` is (the folder of) a latent store."""
    return (Path(path) / INDEX).is_file()


def _is_index(folder: Path) -> bool:
    """Whether ``folder`` holds a readable latent store index (another tool's index.json is not one)."""
    try:
        read_index(folder)
        return True
    except DataError:
        return False


# ----------------------------------------------------------------------------- the command line

def _describe(folder: Path) -> str:
    try:
        index = read_index(folder)
        spec = index["spec"]
        return (f"{spec['num_rows']} images, {spec['image_size']} px, VAE {spec['vae'][:8]}, source "
                f"{spec['source'][:8]}, built {index.get('built', '?')}")
    except (DataError, KeyError, TypeError):
        return "incomplete or damaged (encode again to continue it, or remove it)"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.data.latent_store",
                                     description="List, verify or remove latent stores (a run's automatic ones: "
                                                 "<output-dir>/../latent_cache).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the stores in a folder, their sizes and sources").add_argument("folder")
    sub.add_parser("verify", help="check every file of a store against its index (checksums)").add_argument("store")
    remove = sub.add_parser("remove", help="delete stores (a run encodes what it needs again)")
    remove.add_argument("stores", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "list":
        root = Path(args.folder)
        if not root.is_dir():
            print(f"error: {root} is not a folder", file=sys.stderr)
            return 2
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and STORE_NAME.fullmatch(p.name)):
            print(f"{folder}  {_size(folder) / 2 ** 20:.1f} MiB  {_describe(folder)}")
        return 0
    if args.command == "verify":
        problem = store_problem(Path(args.store), deep=True)
        if problem:
            print(f"error: latent store {args.store}: {problem}", file=sys.stderr)
            return 2
        print(f"{args.store}: every file matches its index")
        return 0
    folders = [Path(name) for name in args.stores]
    for folder in folders:      # every one checked before any is removed
        if folder.is_symlink() or not folder.is_dir() or not (STORE_NAME.fullmatch(folder.name) or _is_index(folder)):
            print(f"error: {folder} is not a latent store (a folder with {INDEX}, or named as a run names its "
                  "stores); nothing was removed", file=sys.stderr)
            return 2
    for folder in folders:
        shutil.rmtree(folder)
        print(f"removed {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
