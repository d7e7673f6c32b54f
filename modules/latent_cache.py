"""Latents of a data set, encoded once by the frozen VAE and reused by later runs.

Each image is stored as its posterior mean and std (float16), and the same for its
horizontal flip when flips are on, so stage 2 draws a fresh latent sample every step
without running the encoder. The cache is a ``datasets`` folder named by a key over the
VAE's weights and config, the data's files, the image size and the flip setting, and holds
``cache_info.json`` (written last) with that key. A cache whose key or size does not match
is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from modules.config import DataConfig

logger = logging.getLogger("modules.latent_cache")
INFO_NAME = "cache_info.json"


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def vae_fingerprint(vae_path: Path) -> str:
    """Hash of a VAE folder's files (or of a single-file checkpoint)."""
    h = hashlib.sha256()
    files = [vae_path] if vae_path.is_file() else sorted(p for p in vae_path.iterdir() if p.is_file())
    for path in files:
        h.update(path.name.encode())
        _hash_file(path, h)
    return h.hexdigest()[:16]


def data_fingerprint(path: str) -> str:
    """Hash of every file's relative path, size and modification time (or the hub name)."""
    h = hashlib.sha256()
    root = Path(path)
    if not root.exists():
        h.update(path.encode())
        return h.hexdigest()[:16]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            f = Path(dirpath) / name
            st = f.stat()
            h.update(f"{f.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cache_key(vae_folder: Path, data_cfg: DataConfig, with_masks: bool) -> dict:
    return {
        "vae": vae_fingerprint(vae_folder),
        "data": data_fingerprint(data_cfg.path),
        "data_path": str(data_cfg.path),
        "split": data_cfg.split,
        "image_size": data_cfg.image_size,
        "hflip": data_cfg.hflip,
        "masks": with_masks,
        "format": 1,
    }


def cache_folder(cache_root: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root / f"latents_{digest}"


def cache_problem(folder: Path, key: dict, num_items: int) -> str | None:
    """Why ``folder`` cannot be used as the cache for ``key``, or None if it can."""
    info_path = folder / INFO_NAME
    if not info_path.is_file():
        return "no cache yet" if not folder.exists() else "incomplete cache (no cache_info.json)"
    info = json.loads(info_path.read_text())
    if info.get("key") != key:
        changed = sorted(k for k in key if info.get("key", {}).get(k) != key[k])
        return f"stale cache (changed: {', '.join(changed)})"
    if info.get("num_items") != num_items:
        return f"cache holds {info.get('num_items')} items, the data set has {num_items}"
    return None


@torch.no_grad()
def _encode_shard(vae, dataset, indices: list[int], batch_size: int, device, with_flip: bool, with_masks: bool):
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        items = [dataset[i] for i in chunk]
        images = torch.stack([it["image"] for it in items]).to(device)
        posterior = vae.encode(images)
        mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
        if with_flip:
            flipped = vae.encode(torch.flip(images, dims=[3]))
            mean_f, std_f = flipped.mean.float().cpu(), flipped.std.float().cpu()
        for j, item in enumerate(items):
            row = {"index": chunk[j], "label": int(item["label"]), "substituted": int(item["substituted"]),
                   "mean": mean[j].numpy().astype(np.float16), "std": std[j].numpy().astype(np.float16)}
            if with_flip:
                row["mean_flip"] = mean_f[j].numpy().astype(np.float16)
                row["std_flip"] = std_f[j].numpy().astype(np.float16)
            if with_masks:
                row["mask"] = (item["mask"][0].numpy() > 0.5).astype(np.uint8)
            yield row


def build_or_load(accelerator, vae, vae_folder: Path, dataset, data_cfg: DataConfig, cache_root: Path,
                  batch_size: int) -> "LatentDataset":
    """Return the cached latents of ``dataset``, encoding them first if needed (all processes help)."""
    import datasets
    datasets.disable_progress_bars()

    with_masks = bool(getattr(dataset, "has_masks", False))
    key = cache_key(vae_folder, data_cfg, with_masks)
    folder = cache_folder(cache_root, key)
    problem = cache_problem(folder, key, len(dataset))
    if problem is None:
        logger.info("using latent cache %s", folder)
        return LatentDataset(folder, data_cfg.hflip)
    logger.info("building latent cache %s (%s)", folder, problem)
    rank, world = accelerator.process_index, accelerator.num_processes
    shard_dir = folder.with_name(folder.name + ".shards")
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(shard_dir, ignore_errors=True)
        shard_dir.mkdir(parents=True)
    accelerator.wait_for_everyone()
    was_training = getattr(dataset, "training", False)
    dataset.train(False)
    indices = list(range(rank, len(dataset), world))
    shard = datasets.Dataset.from_list(list(_encode_shard(
        vae, dataset, indices, batch_size, accelerator.device, data_cfg.hflip, with_masks)))
    shard.save_to_disk(str(shard_dir / f"rank_{rank}"))
    dataset.train(was_training)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        parts = [datasets.load_from_disk(str(shard_dir / f"rank_{r}")) for r in range(world)]
        merged = datasets.concatenate_datasets(parts)
        merged = merged.select(np.argsort(np.asarray(merged["index"])))
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_to_disk(str(tmp))
        substituted = int(sum(merged["substituted"]))
        (tmp / INFO_NAME).write_text(json.dumps(
            {"key": key, "num_items": len(merged), "substituted": substituted}, indent=1))
        tmp.rename(folder)
        shutil.rmtree(shard_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return LatentDataset(folder, data_cfg.hflip)


class LatentDataset(torch.utils.data.Dataset):
    """Cached posteriors; item ``(index, aug_seed)`` picks the flipped copy by ``aug_seed``."""

    def __init__(self, folder: Path, hflip: bool):
        import datasets
        self.table = datasets.load_from_disk(str(folder)).with_format("torch")
        self.hflip = hflip
        self.has_masks = "mask" in self.table.column_names
        self.info = json.loads((folder / INFO_NAME).read_text())

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key) -> dict:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        row = self.table[int(index)]
        flip = self.hflip and aug_seed is not None and random.Random(aug_seed).random() < 0.5
        out = {"mean": row["mean_flip" if flip else "mean"].float(),
               "std": row["std_flip" if flip else "std"].float(),
               "label": row["label"].long(), "index": row["index"].long(),
               "substituted": torch.tensor(0)}
        if self.has_masks:
            mask = row["mask"].float()[None]
            out["mask"] = torch.flip(mask, dims=[2]) if flip else mask
        return out
