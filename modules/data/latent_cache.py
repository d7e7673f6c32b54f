"""Latents of a data set, encoded once by the frozen VAE and reused by later runs.

Each image is stored as its posterior mean and std (float16), and the same for its
horizontal flip when flips are on, so stage 2 draws a fresh latent sample every step
without running the encoder. A text-conditioned run also stores each caption's token embeddings
(float16, column ``text``) and the empty prompt's (``null_text.safetensors``), so training never
runs the text encoder. The cache is a ``datasets`` folder named by a key over the
VAE's identity (its weights and config), the data's fingerprint (every file's path, size,
mtime, ctime and inode, and the captions), the image size, the flip setting and the text
encoder's identity and layer. ``cache_info.json``, written
last, holds that key and the SHA-256 of every file, checked before each use: a cache whose
key, size or content does not match is rebuilt (saying why), never used.

One process builds a given cache at a time (an OS lock on ``.<folder>.lock``); another run
that needs it waits, then uses the finished cache. A failed write (a full disk) is one line,
and no half-written folder is left behind.

``python -m modules.data.latent_cache list CACHE_DIR`` shows the caches and their sizes;
``python -m modules.data.latent_cache remove FOLDER ...`` deletes old ones.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from modules import durable
from modules.config.schema import DataConfig
from modules.data.order import held_out as held_out_positions
from modules.errors import CheckpointError, DataError

logger = logging.getLogger(__name__)
INFO_NAME = "cache_info.json"
CACHE_NAME = re.compile(r"latents_[0-9a-f]{16}(\.tmp|\.shards)?")     # what cache_folder and _build name
NULL_TEXT_NAME = "null_text.safetensors"
FORMAT = 2


def cache_key(vae_identity: str, data_fingerprint: str, data_cfg: DataConfig, with_masks: bool,
              text_encoder=None) -> dict:
    key = {"vae": vae_identity[:32], "data": data_fingerprint[:32], "split": data_cfg.split,
           "image_size": data_cfg.image_size, "hflip": data_cfg.hflip, "masks": with_masks, "format": FORMAT}
    if text_encoder is not None:
        key["text"] = f"{text_encoder.identity[:32]}:{text_encoder.layer}"
    return key


def cache_folder(cache_root: Path, key: dict) -> Path:
    digest = durable.fingerprint(key)[:16]
    return cache_root / f"latents_{digest}"


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): durable.sha256_file(path)
            for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != INFO_NAME)}


def cache_problem(folder: Path, key: dict, num_items: int) -> Optional[str]:
    """Why ``folder`` cannot be used as the cache for ``key``, or None if it can."""
    info_path = folder / INFO_NAME
    if not info_path.is_file():
        return _nearest_other_cache(folder, key) if not folder.exists() else "incomplete cache (no cache_info.json)"
    try:
        info = json.loads(info_path.read_text())
        saved_key, files = info["key"], info["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        return f"damaged cache (unreadable {INFO_NAME}: {e})"
    if saved_key != key:
        changed = sorted(k for k in key if not isinstance(saved_key, dict) or saved_key.get(k) != key[k])
        return f"stale cache (changed: {', '.join(changed)})"
    if info.get("num_items") != num_items:
        return f"cache holds {info.get('num_items')} items, the data set has {num_items}"
    found = file_hashes(folder)
    damage = {"missing": sorted(set(files) - set(found)), "unexpected": sorted(set(found) - set(files)),
              "changed since it was built": sorted(n for n in files if n in found and found[n] != files[n])}
    damaged = [f"{what}: {', '.join(names[:3])}" for what, names in damage.items() if names]
    return f"damaged cache ({'; '.join(damaged)})" if damaged else None


def _nearest_other_cache(folder: Path, key: dict) -> str:
    """Why no cache fits ``key``, named by the other cache next to it that differs least: changed
    data then reads as such, not as a first run."""
    nearest = None
    for info_path in folder.parent.glob(f"latents_*/{INFO_NAME}"):
        try:
            saved = json.loads(info_path.read_text())["key"]
            changed = sorted(k for k in key if saved.get(k) != key[k])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if nearest is None or len(changed) < len(nearest[2]):
            nearest = (info_path.parent.name, saved, changed)
    if nearest is None:
        return f"no cache for data fingerprint {key['data'][:12]} with this VAE and settings yet"
    name, saved, changed = nearest
    if changed == ["data"]:
        return (f"no cache for this data yet: its fingerprint {key['data'][:12]} differs from "
                f"{str(saved['data'])[:12]} of cache {name} (same VAE and settings), so the data changed or is "
                "another data set")
    return f"no cache for these settings yet (the nearest, {name}, differs in: {', '.join(changed)})"


def _main_process_verdict(accelerator, check):
    """``check()`` run by the main process, its answer given to every process."""
    from accelerate.utils import broadcast_object_list
    box = [check() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


@contextlib.contextmanager
def _build_lock(folder: Path, accelerator) -> Iterator[None]:
    """The main process holds ``.<folder>.lock`` (waiting for another run's build to finish)."""
    lock = None
    if accelerator.is_main_process:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = durable.Lock(folder.with_name(f".{folder.name}.lock"))
        problem = lock.acquire(wait=False)
        if problem and problem.startswith("in use"):
            logger.info("another run is building latent cache %s; waiting for it", folder)
            problem = lock.acquire(wait=True)
        if problem:
            raise CheckpointError(f"latent cache {folder}: {problem}")
    accelerator.wait_for_everyone()
    try:
        yield
    finally:
        accelerator.wait_for_everyone()
        if lock is not None:
            lock.release()


@torch.no_grad()
def _encode_shard(vae, dataset, indices: list[int], batch_size: int, device, with_flip: bool, with_masks: bool,
                  text_encoder=None):
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        items = [dataset[i] for i in chunk]
        images = torch.stack([it["image"] for it in items]).to(device)
        posterior = vae.encode(images)
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        if with_flip:
            flipped = vae.encode(torch.flip(images, dims=[3]))
            mean_f, std_f = flipped.mean.float().cpu(), flipped.std.float().cpu()
        if text_encoder is not None:
            captions = [it["caption"] for it in items]
            text = text_encoder.encode_unique(captions).half().cpu()
            too_long = text_encoder.too_long(captions)
        for j, item in enumerate(items):
            row = {"index": chunk[j], "label": int(item["label"]), "substituted": int(item["substituted"]),
                   "mean": mean[j].numpy().astype(np.float16), "std": std[j].numpy().astype(np.float16)}
            if with_flip:
                row["mean_flip"] = mean_f[j].numpy().astype(np.float16)
                row["std_flip"] = std_f[j].numpy().astype(np.float16)
            if with_masks:
                row["mask"] = (item["mask"][0].numpy() > 0.5).astype(np.uint8)
            if text_encoder is not None:
                row.update(text=text[j].numpy(), caption=captions[j], truncated=int(too_long[j]))
            yield row


def _build(accelerator, vae, dataset, data_cfg: DataConfig, folder: Path, key: dict, batch_size: int,
           text_encoder=None) -> None:
    """Encode ``dataset`` (all processes share the work) into ``folder``, atomically."""
    import datasets
    rank, world = accelerator.process_index, accelerator.num_processes
    shard_dir, tmp = folder.with_name(folder.name + ".shards"), folder.with_name(folder.name + ".tmp")
    if accelerator.is_main_process:
        for stale in (folder, shard_dir, tmp):
            shutil.rmtree(stale, ignore_errors=True)
        shard_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    was_training = getattr(dataset, "training", False)
    dataset.train(False)
    indices = list(range(rank, len(dataset), world))
    shard = datasets.Dataset.from_list(list(_encode_shard(
        vae, dataset, indices, batch_size, accelerator.device, data_cfg.hflip, key["masks"], text_encoder)))
    shard.save_to_disk(str(shard_dir / f"rank_{rank}"))
    dataset.train(was_training)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [datasets.load_from_disk(str(shard_dir / f"rank_{r}")) for r in range(world)]
        merged = datasets.concatenate_datasets(parts)
        merged = merged.select(np.argsort(np.asarray(merged["index"])))
        merged.save_to_disk(str(tmp))
        info = {"key": key, "num_items": len(merged), "substituted": int(sum(merged["substituted"]))}
        if text_encoder is not None:
            save_file({"null_text": text_encoder.null().half().cpu().contiguous()}, tmp / NULL_TEXT_NAME)
            info["truncated_captions"] = int(sum(merged["truncated"]))
        info.update(files=file_hashes(tmp), built=time.strftime("%Y-%m-%d %H:%M:%S"))
        durable.write_json(tmp / INFO_NAME, info)
        durable.publish_folder(tmp, folder)
        shutil.rmtree(shard_dir, ignore_errors=True)


def build_or_load(accelerator, vae, vae_identity: str, dataset, data_cfg: DataConfig, cache_root: Path,
                  batch_size: int, text_encoder=None) -> "LatentDataset":
    """Return the cached latents of ``dataset``, encoding them first if needed (all processes help);
    with a ``text_encoder`` (modules.text_encoder.TextEncoder), its captions' embeddings too."""
    import datasets
    datasets.disable_progress_bars()
    key = cache_key(vae_identity, dataset.fingerprint(), data_cfg, bool(getattr(dataset, "has_masks", False)),
                    text_encoder)
    folder = cache_folder(cache_root, key)
    # A valid cache is used without its lock (a lock is for writers: a read-only cache works too);
    # the build, and the check that decides it, run under the lock.
    problem = _main_process_verdict(accelerator, lambda: cache_problem(folder, key, len(dataset)))
    try:
        if problem is not None:
            with _build_lock(folder, accelerator):
                problem = _main_process_verdict(accelerator, lambda: cache_problem(folder, key, len(dataset)))
                if problem is not None:
                    logger.info("building latent cache %s (%s)", folder, problem)
                    _build(accelerator, vae, dataset, data_cfg, folder, key, batch_size, text_encoder)
        if problem is None:
            logger.info("using latent cache %s", folder)
    except durable.WRITE_ERRORS as e:
        if accelerator.is_main_process:
            for part in (".shards", ".tmp"):
                shutil.rmtree(folder.with_name(folder.name + part), ignore_errors=True)
        raise CheckpointError(f"could not write the latent cache {folder} ({durable.write_failure(e)}); "
                              "nothing was trained yet, and no half-written cache is left") from None
    latents = LatentDataset(folder, data_cfg.hflip)
    truncated = latents.info.get("truncated_captions", 0)
    if text_encoder is not None and accelerator.is_main_process and truncated:
        logger.warning("%d caption(s) of the data are longer than the text encoder's %d tokens: truncated (as Stable "
                       "Diffusion does)", truncated, text_encoder.tokens)
    return latents


class LatentDataset(torch.utils.data.Dataset):
    """Cached posteriors (and text embeddings); item ``(index, aug_seed)`` picks the flipped copy by
    ``aug_seed``. ``null_text``: the empty prompt's embedding, for a cache with text."""

    def __init__(self, folder: Path, hflip: bool):
        import datasets
        self.table = datasets.load_from_disk(str(folder)).with_format("torch")
        self.hflip = hflip
        self.has_masks = "mask" in self.table.column_names
        self.has_text = "text" in self.table.column_names
        self.null_text = load_file(str(folder / NULL_TEXT_NAME))["null_text"].float() if self.has_text else None
        self.info = json.loads((folder / INFO_NAME).read_text())
        self.rows = np.arange(len(self.table))

    def __len__(self) -> int:
        return len(self.rows)

    def split(self, held_out: int) -> tuple["LatentDataset", "LatentDataset"]:
        """(training view, validation view): ``held_out`` rows spread evenly over the cache."""
        total = len(self)
        if not 0 < held_out < total:
            raise DataError(f"eval.val_images={held_out}: must be between 1 and the {total - 1} the cache can spare")
        held = held_out_positions(total, held_out)
        views = []
        for rows in (np.setdiff1d(self.rows, self.rows[held]), self.rows[held]):
            view = copy.copy(self)
            view.rows = rows
            views.append(view)
        return views[0], views[1]

    def caption(self, index: int) -> str:
        """Item ``index``'s caption (a cache with text)."""
        return self.table[int(self.rows[int(index)])]["caption"]

    def __getitem__(self, key) -> dict:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        row = self.table[int(self.rows[int(index)])]
        flip = self.hflip and aug_seed is not None and random.Random(aug_seed).random() < 0.5
        out = {"mean": row["mean_flip" if flip else "mean"].float(),
               "std": row["std_flip" if flip else "std"].float(),
               "label": row["label"].long(), "index": row["index"].long(),
               "substituted": torch.tensor(0)}
        if self.has_masks:
            mask = row["mask"].float()[None]
            out["mask"] = torch.flip(mask, dims=[2]) if flip else mask
        if self.has_text:
            out["text"] = row["text"].float()
        return out


# ----------------------------------------------------------------------------- housekeeping

def _describe(folder: Path) -> str:
    try:
        info = json.loads((folder / INFO_NAME).read_text())
        return (f"{info['num_items']} images, {info['key']['image_size']} px, built {info.get('built', '?')}, "
                f"data {info['key']['data'][:8]}, VAE {info['key']['vae'][:8]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "incomplete or damaged (safe to remove)"


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.data.latent_cache",
                                     description="List or remove latent caches (default location: "
                                                 "<output-dir>/../latent_cache).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the caches in CACHE_DIR, their keys and sizes").add_argument("cache_dir")
    remove = sub.add_parser("remove", help="delete cache folders (a run rebuilds what it needs)")
    remove.add_argument("folders", nargs="+")
    args = parser.parse_args(argv)
    if args.command == "list":
        root = Path(args.cache_dir)
        if not root.is_dir():
            print(f"error: {root} is not a folder", file=sys.stderr)
            return 2
        for folder in sorted(root.glob("latents_*")):
            if not CACHE_NAME.fullmatch(folder.name) or not folder.is_dir():
                continue
            if folder.suffix in (".tmp", ".shards"):
                what = "left by an interrupted build (safe to remove)"
            else:
                what = _describe(folder)
            print(f"{folder}  {_folder_size(folder) / 2 ** 20:.1f} MiB  {what}")
        return 0
    folders = [Path(name) for name in args.folders]
    for folder in folders:      # every one checked before any is removed
        if not CACHE_NAME.fullmatch(folder.name) or not folder.is_dir() or folder.is_symlink():
            print(f"error: {folder} is not a latent cache folder (named latents_ and 16 hex digits, as a run names "
                  "them); nothing was removed", file=sys.stderr)
            return 2
    for folder in folders:
        shutil.rmtree(folder)
        print(f"removed {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
