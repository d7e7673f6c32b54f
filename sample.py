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
import math
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from modules.config import ConfigError, diff_fields
from modules.data import UnreadableImage, mask_tensor
from modules.export import ModelFolderError, find_model_folder, read_config
from modules.generation import SAMPLERS_FOR, GenerationSpec, decode_latents, generate_latents, sample_seed
from modules.samplers import METHODS
from modules.training import make_grid, run_cli
from modules.unet import load_unet
from modules.vae import load_vae

logger = logging.getLogger("sample")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


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


def check_steps(spec: GenerationSpec, sampler: str, steps: int) -> None:
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if sampler == "shortcut":
        if steps & (steps - 1):
            raise ConfigError(f"--steps {steps}: shortcut sampling needs a power of two (1, 2, 4, ..., "
                              f"{spec.denoise_timesteps})")
        if steps > spec.denoise_timesteps:
            raise ConfigError(f"--steps {steps}: exceeds the trained maximum of {spec.denoise_timesteps} "
                              "(shortcut.denoise_timesteps)")
    if sampler not in SAMPLERS_FOR[spec.objective]:
        raise ConfigError(f"--sampler {sampler}: does not fit a {spec.objective} model "
                          f"(use one of {', '.join(SAMPLERS_FOR[spec.objective])})")
    if sampler in ("ddim", "ddpm") and steps > spec.ddpm.num_timesteps:
        raise ConfigError(f"--steps {steps}: exceeds the model's {spec.ddpm.num_timesteps} DDPM timesteps")


def load_masks(folder: Path, image_size: int) -> tuple[list[str], torch.Tensor]:
    """Masks read exactly as training reads them (modules/data.py), one sample per file."""
    if not folder.is_dir():
        raise ConfigError(f"--masks {folder}: not a folder")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
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
    config = read_config(unet_folder, kind="unet")
    recorded = config.get("vae", {})
    vae_path = args.vae or recorded.get("path")
    if not vae_path:
        raise ModelFolderError(f"{unet_folder}: records no VAE; pass --vae")
    if not Path(vae_path).exists():
        raise ModelFolderError(f"VAE {vae_path} (recorded by {unet_folder}) does not exist; pass --vae")
    vae_folder = find_model_folder(vae_path, "vae")
    vae = load_vae(vae_folder)
    vae_model = dataclasses.asdict(vae.config)
    if recorded.get("model"):
        structural = ["in_channels", "base_channels", "channel_mult", "num_res_blocks", "latent_channels",
                      "resample", "scale_factor"]
        mismatch = diff_fields({k: recorded["model"].get(k) for k in structural},
                               {k: vae_model.get(k) for k in structural})
        if mismatch:
            raise ModelFolderError(f"VAE {vae_folder} does not match the one the UNet was trained with: "
                                   + "; ".join(mismatch))
    if vae.config.latent_channels != config["model"]["in_channels"]:
        raise ModelFolderError(f"VAE {vae_folder} has {vae.config.latent_channels} latent channels, "
                               f"the UNet expects {config['model']['in_channels']}")
    return load_unet(unet_folder).to(device), vae.to(device).eval(), config, unet_folder


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    unet, vae, config, unet_folder = load_models(args, device)
    spec = GenerationSpec.from_export(config)
    sampler = args.sampler or {"shortcut": "shortcut", "flow": "euler", "ddpm": "ddim"}[spec.objective]
    check_steps(spec, sampler, args.steps)
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
        image_size = spec.latent_size * config["cond"]["image_downsample"]
        names, cond = load_masks(Path(args.masks), image_size)
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
        seeds = [sample_seed(args.seed, i) for i in idx]
        batch_cond = None if cond is None else cond[idx].to(device)
        with autocast:
            z = generate_latents(unet, spec, batch_cond, seeds, args.steps, sampler, args.cfg_scale, args.eta, device)
            images = decode_latents(vae, z.float(), scale, args.batch_size)
        arrays = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        for j, i in enumerate(idx):
            Image.fromarray(arrays[j]).save(out / files[i])
            condition = None if cond is None else (f"mask:{names[i]}" if names is not None else int(cond[i]))
            records.append({"file": files[i], "seed": seeds[j], "steps": args.steps, "sampler": sampler,
                            "guidance": args.cfg_scale, "condition": condition})
        if args.grid:
            images_all.append(images.cpu())
    with open(out / "manifest.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if args.grid:
        images = torch.cat(images_all)
        per_row = math.ceil(math.sqrt(count))
        rows = [images[i:i + per_row] for i in range(0, count, per_row)]
        if len(rows[-1]) < per_row:
            pad = torch.full((per_row - len(rows[-1]), *images.shape[1:]), -1.0)
            rows[-1] = torch.cat([rows[-1], pad])
        grid = make_grid(rows)
        Image.fromarray(((grid + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()).save(out / "grid.png")
    logger.info("wrote %d images and manifest.jsonl to %s", count, out)


if __name__ == "__main__":
    run_cli(main)
