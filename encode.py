"""Encode a data set into a latent store once, on one or many GPUs; train_unet.py then trains from the store alone.

    accelerate launch encode.py --data ./imagenet/train --vae path/to/sd-vae-ft-ema --out stores/in256 \
        data.image_size=256 cond.type=class
    accelerate launch encode.py --data '/data/in1k/train-{000000..001023}.tar' --vae path/to/sd-vae-ft-ema \
        --out stores/in256 data.image_size=256 cond.type=class          # WebDataset tar shards, read as streams
    python encode.py --config tiny --data data/shapes --vae runs/vae --out stores/shapes cond.type=class

The settings are those of the run config train_unet.py reads (``--config`` and ``key=value`` words):
``data.image_size``, ``data.hflip`` (also encode each image's horizontal flip), ``data.split``,
``data.num_workers`` (decoding processes per GPU), ``data.streaming`` (a hub data set read as a stream),
``cond.type`` (``mask``: the masks; ``text``: the captions' embeddings, with ``cond.text_encoder``,
``cond.text_layer``, ``cond.caption_column``); ``--batch-size`` is the encoder's batch. Every process
encodes its shards straight to disk; a killed encode continues at the first unfinished shard when
the same command runs again, with any number of processes. The store is checked file by file at the
end (``python -m modules.data.latent_store verify STORE`` does it again at any time). Train from it with
``train_unet.py --data STORE`` (the images are no longer needed).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

from accelerate import PartialState

from modules.config.cli import run_cli
from modules.config.io import load_config
from modules.config.schema import UNetRunConfig
from modules.data import latent_store
from modules.data.dataset import build_dataset
from modules.data.streams import StreamSource, is_tar_source
from modules.errors import ConfigError
from modules.interop.clip import TextEncoder
from modules.interop.vae import load_vae
from modules.run.accelerator import finish, process_state
from modules.run.export import find_model_folder, vae_identity

logger = logging.getLogger("encode")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="a stage-2 preset or JSON file (its data.* and cond.* settings)")
    parser.add_argument("--data", required=True, help="image folder, save_to_disk folder, hub name, or WebDataset "
                        "tar shards (a folder of .tar, a glob, or name-{000000..000127}.tar)")
    parser.add_argument("--vae", required=True, help="exported VAE folder, train_vae.py output dir, or a diffusers VAE")
    parser.add_argument("--out", required=True, help="the store's folder (created; an unfinished one is continued)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per encoder call, per process")
    parser.add_argument("--shard-rows", type=int, default=latent_store.SHARD_ROWS,
                        help="rows per store shard for an image folder or data set (a stream: one shard per input shard)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (data.*, cond.*)")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    if not 1 <= args.batch_size <= 4096 or not 1 <= args.shard_rows <= 1 << 20:
        raise ConfigError("--batch-size must be in 1..4096 and --shard-rows in 1..1048576")
    cfg = load_config(UNetRunConfig, "unet", args.config, [*args.overrides, f"data.path={args.data}"])
    streamed = is_tar_source(cfg.data.path) or cfg.data.streaming
    if streamed and cfg.cond.type == "mask":     # before any model is loaded or stream opened
        raise ConfigError("cond.type=mask: masks are encoded from image folders and saved data sets, not streams")
    state = process_state()
    device = state.device
    vae = load_vae(find_model_folder(args.vae, "vae")).to(device).eval().requires_grad_(False)
    text_encoder = TextEncoder(cfg.cond.text_encoder, cfg.cond.text_layer, device) if cfg.cond.type == "text" else None
    captions = (cfg.cond.caption_column, cfg.cond.allow_empty_caption) if text_encoder is not None else (None, False)
    out = Path(args.out)
    vae_id = vae_identity(vae)
    if streamed:
        source = StreamSource(cfg.data.path, cfg.data.image_size, cfg.data.split, *captions)
        shards = latent_store.StreamShards(source, args.batch_size)
        spec = latent_store.StoreSpec(vae=vae_id, source=source.identity, image_size=cfg.data.image_size,
                                      hflip=cfg.data.hflip, masks=False, text=latent_store.text_key(text_encoder),
                                      num_rows=0)
    else:
        dataset = build_dataset(cfg.data, *captions, masks=cfg.cond.type == "mask")
        shards = latent_store.IndexedShards(dataset, args.shard_rows, args.batch_size, cfg.data.num_workers)
        spec = latent_store.spec_of(dataset, vae_id, cfg.data.image_size, cfg.data.hflip,
                                    cfg.cond.type == "mask", text_encoder)
    if state.is_main_process:
        latent_store.claim_store_folder(out, spec)
    state.wait_for_everyone()
    latent_store.encode(vae, shards, spec, out, device, state.process_index, state.num_processes, text_encoder)
    if state.is_main_process:
        problem = latent_store.store_problem(out, deep=True)
        if problem:
            raise ConfigError(f"latent store {out}: {problem}")
        store = latent_store.LatentStore(out)
        logger.info("latent store %s: %d rows, %d classes, every file checked; train with --data %s", out,
                    len(store), store.num_classes, out)


if __name__ == "__main__":
    run_cli(main)
    finish(PartialState())
