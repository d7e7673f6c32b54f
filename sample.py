"""Generate images with a trained UNet (EMA weights) and its VAE.

    python sample.py --unet runs/unet --out samples --num-samples 64 --steps 1
    python sample.py --unet runs/unet --out samples --steps 4 --class-label 2 --cfg-scale 1.5 --grid
    python sample.py --unet runs/unet --out samples --masks my_masks/ --steps 1

Writes one PNG per image and ``manifest.jsonl`` (one JSON line per image: file, seed,
steps, sampler, guidance, condition). Image i depends only on (--seed, i) and its
condition, so the batch size never changes the result.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modules.cli import run_cli
from modules.config import DEFAULT_SAMPLER, sampling_problem
from modules.config_io import diff_fields
from modules.errors import ConfigError, ModelFolderError
from modules.export import find_model_folder, load_unet, read_unet_export
from modules.generation import GenerationSpec, decode_latents, generate_latents
from modules.image_io import UnreadableImage, find_images, mask_tensor, save_png, tile, to_uint8
from modules.samplers import METHODS
from modules.seeding import image_seed
from modules.vae_loading import load_vae

logger = logging.getLogger("sample")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet", required=True, help="exported UNet folder, or a train_unet.py output dir (uses unet_ema)")
    p.add_argument("--vae", default=None, help="VAE folder or train_vae.py output dir (default: the one the UNet recorded)")
    p.add_argument("--out", required=True, help="output folder for PNGs and manifest.jsonl")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=1, help="network evaluations per image (shortcut: a power of two)")
    p.add_argument("--sampler", choices=METHODS, default=None, help="default: shortcut / euler / ddim by objective")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance w (1 = conditional only)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--class-label", type=int, default=None)
    cond.add_argument("--masks", default=None, help="folder of mask images: one sample per mask, named by its stem")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--grid", action="store_true", help="also write grid.png")
    p.add_argument("--overwrite", action="store_true", help="allow replacing files in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def load_masks(folder: Path, image_size: int) -> tuple[list[str], torch.Tensor]:
    """Masks read exactly as training reads them (modules/data.py), one sample per file."""
    if not folder.is_dir():
        raise ConfigError(f"--masks {folder}: not a folder")
    files = find_images(folder, recursive=False)
    if not files:
        raise ConfigError(f"--masks {folder}: no mask images found")
    masks = []
    for f in files:
        try:
            masks.append(mask_tensor(f, image_size))
        except UnreadableImage as e:
            raise ConfigError(f"--masks: cannot read {f} ({e})") from None
    return [f.stem for f in files], torch.stack(masks)


def load_models(args, device):
    unet_folder = find_model_folder(args.unet, "unet_ema")
    export = read_unet_export(unet_folder)
    recorded = export.vae
    vae_path = args.vae or recorded.get("path")
    if not vae_path:
        raise ModelFolderError(f"{unet_folder}: records no VAE; pass --vae")
    if not Path(vae_path).exists():
        raise ModelFolderError(f"VAE {vae_path} (recorded by {unet_folder}) does not exist; pass --vae")
    vae_folder = find_model_folder(vae_path, "vae")
    vae = load_vae(vae_folder)
    vae_model = dataclasses.asdict(vae.config)
    if isinstance(recorded.get("model"), dict):
        structural = ["in_channels", "base_channels", "channel_mult", "num_res_blocks", "latent_channels",
                      "resample", "scale_factor"]
        mismatch = diff_fields({k: recorded["model"].get(k) for k in structural},
                               {k: vae_model.get(k) for k in structural})
        if mismatch:
            raise ModelFolderError(f"VAE {vae_folder} does not match the one the UNet was trained with: "
                                   + "; ".join(mismatch))
    if vae.config.latent_channels != export.config.model.in_channels:
        raise ModelFolderError(f"VAE {vae_folder} has {vae.config.latent_channels} latent channels, "
                               f"the UNet expects {export.config.model.in_channels}")
    return load_unet(unet_folder, export).to(device), vae.to(device).eval(), export, unet_folder


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    unet, vae, export, unet_folder = load_models(args, device)
    spec = GenerationSpec.from_run_config(export.config)
    sampler = args.sampler or DEFAULT_SAMPLER[spec.objective]
    problem = sampling_problem(spec.objective, sampler, args.steps, spec.denoise_timesteps, spec.ddpm.num_timesteps)
    if problem:
        raise ConfigError(f"--sampler {sampler} --steps {args.steps}: {problem}")
    if args.num_samples < 1 or args.batch_size < 1:
        raise ConfigError("--num-samples and --batch-size must be >= 1")
    if not 0 <= args.eta <= 1:
        raise ConfigError(f"--eta {args.eta}: must be in [0, 1]")
    if spec.cond_type == "none" and args.cfg_scale != 1.0:
        logger.warning("--cfg-scale %s ignored: %s is an unconditional model", args.cfg_scale, unet_folder)

    names, cond = None, None
    if args.masks is not None:
        if spec.cond_type != "mask":
            raise ConfigError(f"--masks: {unet_folder} is a '{spec.cond_type}'-conditioned model, not mask-conditioned")
        names, cond = load_masks(Path(args.masks), export.config.data.image_size)
        logger.info("--masks: one sample per mask file (%d); --num-samples is not used", len(names))
    elif spec.cond_type == "mask":
        raise ConfigError(f"{unet_folder} is mask-conditioned: pass --masks DIR")
    elif spec.cond_type == "class":
        if args.class_label is not None and not 0 <= args.class_label < spec.num_classes:
            raise ConfigError(f"--class-label {args.class_label}: the model knows classes 0..{spec.num_classes - 1}")
        labels = [args.class_label if args.class_label is not None else i % spec.num_classes
                  for i in range(args.num_samples)]
        cond = torch.tensor(labels)
    elif args.class_label is not None:
        raise ConfigError(f"--class-label: {unet_folder} is an unconditional model")
    count = len(names) if names is not None else args.num_samples

    out = Path(args.out)
    files = [f"{names[i]}.png" if names is not None else f"{i:06d}.png" for i in range(count)]
    existing = [f for f in files + ["manifest.jsonl", "grid.png"] if (out / f).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"--out {out} already holds {existing[0]} (and {len(existing) - 1} more); "
                          "pass --overwrite or choose another folder")
    out.mkdir(parents=True, exist_ok=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    scale = vae.config.scale_factor
    images_all, records = [], []
    for start in tqdm(range(0, count, args.batch_size), desc="sampling"):
        idx = list(range(start, min(count, start + args.batch_size)))
        seeds = [image_seed(args.seed, i) for i in idx]
        batch_cond = None if cond is None else cond[idx].to(device)
        with autocast:
            z = generate_latents(unet, spec, batch_cond, seeds, args.steps, sampler, args.cfg_scale, args.eta, device)
            images = decode_latents(vae, z.float(), scale, args.batch_size)
        arrays = to_uint8(images)
        for j, i in enumerate(idx):
            save_png(arrays[j], out / files[i])
            condition = None if cond is None else (f"mask:{names[i]}" if names is not None else int(cond[i]))
            records.append({"file": files[i], "seed": seeds[j], "steps": args.steps, "sampler": sampler,
                            "guidance": args.cfg_scale, "condition": condition})
        if args.grid:
            images_all.append(images.cpu())
    with open(out / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if args.grid:
        save_png(to_uint8(tile(torch.cat(images_all))), out / "grid.png")
    logger.info("wrote %d images and manifest.jsonl to %s", count, out)


if __name__ == "__main__":
    run_cli(main)
