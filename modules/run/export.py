"""Model folders: ``config.json`` + ``model.safetensors`` (like diffusers' save_pretrained).

Weights are only ever read from safetensors, so nothing is unpickled from a user's file.
Folders are written into a temporary sibling and renamed, so a crash never leaves a
half-written export under the final name. A UNet export's ``config.json`` holds the resolved
run config it was trained with (``run_config``, validated when read back like a command-line
config, and the one source a loader reads), a summary of it (``model``, ``cond``,
``objective``, ...), which weights it holds (``online`` or ``ema``), the VAE it was trained with and,
for a text-conditioned model, its text encoder (path and identity: sample.py refuses another).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from modules.config.schema import UNetRunConfig, check_trained
from modules.config.io import diff_fields, from_dict, read_json, to_dict, with_defaults
from modules.errors import ConfigError, ModelFolderError
from modules.core.networks.denoiser import Denoiser
from modules.core.networks import build_network

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_model_folder(folder: str | Path, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, tmp / WEIGHTS_NAME)
    config = {**config, "sha256": {WEIGHTS_NAME: file_sha256(tmp / WEIGHTS_NAME)}}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    return folder


def recover_model_folder(folder: str | Path) -> None:
    """Undo what a kill inside :func:`save_model_folder` left: the previous export back in place
    if the new one never arrived, and no ``.tmp`` / ``.old`` leftovers."""
    folder = Path(folder)
    tmp, old = (folder.with_name(folder.name + suffix) for suffix in (".tmp", ".old"))
    if not folder.exists() and (old / CONFIG_NAME).is_file():
        old.rename(folder)
    for leftover in (tmp, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def read_config(folder: str | Path, kind: str | None = None) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no {CONFIG_NAME}; expected an exported model folder")
    config = read_json(path, ModelFolderError)
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if kind is not None and config.get("kind") != kind:
        raise ModelFolderError(f"{folder}: {CONFIG_NAME} holds {describe_kind(config)}, expected a '{kind}'")
    return config


def describe_kind(config: dict) -> str:
    """What a config.json says its model is, for an error: "a 'unet' model", "no 'kind' entry", "'kind': null"."""
    kind = config.get("kind")
    if isinstance(kind, str) and kind:
        return f"a '{kind}' model"
    return "no 'kind' entry" if "kind" not in config else f"'kind': {json.dumps(kind)} (not a model kind)"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_folder_weights(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """A model folder's weights, checked against the SHA-256 its config.json recorded (when it did)."""
    path = Path(folder) / WEIGHTS_NAME
    tensors = read_weights(path)
    expected = config.get("sha256", {}).get(WEIGHTS_NAME) if isinstance(config.get("sha256"), dict) else None
    if expected and file_sha256(path) != expected:
        raise ModelFolderError(f"{path}: its SHA-256 is {file_sha256(path)[:16]}..., not the {expected[:16]}... "
                               "recorded in config.json: the file is damaged or was replaced")
    return tensors


def read_weights(path: str | Path, error: type[Exception] = ModelFolderError) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else is refused rather than unpickled, and so are
    weights holding NaN or infinity (they would give black images without a word). Problems
    raise ``error`` naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise error(f"{path}: weights file not found")
    if path.suffix != ".safetensors":
        raise error(f"{path}: only .safetensors weights are accepted "
                    "(pickle-based .ckpt/.bin/.pt files can run code when loaded)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise error(f"{path}: not a readable safetensors file ({e})") from None
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise error(f"{path}: {len(broken)} tensor(s) hold NaN or infinite values, e.g. '{broken[0]}'")
    return tensors


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: Path, what: str) -> torch.nn.Module:
    """Strict load with an error that names a few missing / unexpected / mis-shaped keys; ``what`` names
    the model the weights should fit (e.g. "the VAE config")."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        details = []
        if missing:
            details.append(f"{len(missing)} missing: {few(missing)}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
        raise ModelFolderError(f"{where}: weights do not fit {what} ({'; '.join(details)})")
    for key, value in expected.items():
        if sd[key].shape != value.shape:
            raise ModelFolderError(f"{where}: weight '{key}' has shape {tuple(sd[key].shape)}, "
                                   f"{what} needs {tuple(value.shape)}")
    model.load_state_dict(sd, strict=True)
    return model


def find_model_folder(path: str | Path, subfolder: str) -> Path:
    """``path`` itself when it is a model folder, else ``path/subfolder`` (a training output dir)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file() and not (path / subfolder / CONFIG_NAME).is_file():
        return path
    if (path / subfolder / CONFIG_NAME).is_file():
        return path / subfolder
    if path.is_file():
        return path
    raise ModelFolderError(f"{path}: neither a model folder (config.json + {WEIGHTS_NAME}) nor a training "
                           f"output dir with a '{subfolder}' export")


# ----------------------------------------------------------------------------- the stage-2 network

@dataclass
class UNetExport:
    """What an exported UNet folder says about itself."""
    folder: Path
    config: UNetRunConfig      # the resolved run config, derived fields included
    weights: str               # "online" or "ema"
    vae: dict                  # the VAE it was trained with: {"path": ..., "model": {...}}
    text_encoder: Optional[dict] = None   # cond.type=text: modules.text_encoder.TextEncoder.record()


def unet_export_config(cfg: UNetRunConfig, vae: dict, weights: str, text_encoder: Optional[dict] = None) -> dict:
    """``config.json`` of a UNet export: the run config, and a summary of it for a reader's eye."""
    summary = {"model": to_dict(cfg.model), "cond": to_dict(cfg.cond), "objective": cfg.objective,
               "shortcut": to_dict(cfg.shortcut), "ddpm": to_dict(cfg.ddpm), "latent_size": cfg.latent_size}
    ema = {"ema_decay": cfg.ema.decay} if weights == "ema" else {}
    text = {"text_encoder": text_encoder} if text_encoder is not None else {}
    return {"kind": "unet", "weights": weights, **summary, **ema, "vae": vae, **text, "run_config": to_dict(cfg)}


def save_unet(folder: str | Path, state_dict: dict[str, torch.Tensor], cfg: UNetRunConfig, vae: dict,
              weights: str, text_encoder: Optional[dict] = None) -> Path:
    """The one way a UNet is exported: its weights, its run config, its VAE's record (and its text encoder's)."""
    return save_model_folder(folder, state_dict, unet_export_config(cfg, vae, weights, text_encoder))


def read_unet_export(folder: str | Path) -> UNetExport:
    """Read and validate an export's config.json: the run config is checked like a command-line
    one, and the summary entries must agree with it (an edited summary is refused)."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    raw = read_config(folder, kind="unet")
    try:
        if not isinstance(raw.get("run_config"), dict):
            raise ConfigError("no 'run_config' entry (the run config the model was trained with)")
        cfg = from_dict(UNetRunConfig, raw["run_config"], str(path))
        check_trained(cfg)
    except ConfigError as e:
        raise ModelFolderError(f"{path}: {e}") from None
    weights = raw.get("weights", "ema" if "ema_decay" in raw else "online")   # exports before 2026-12: no entry
    vae = raw.get("vae")
    if not isinstance(vae, dict):
        raise ModelFolderError(f"{path}: 'vae' must be the record of the VAE the model was trained with, "
                               f"got {vae!r}")
    text_encoder = raw.get("text_encoder")
    if cfg.cond.type == "text" and not (isinstance(text_encoder, dict)
                                        and isinstance(text_encoder.get("identity"), str)):
        raise ModelFolderError(f"{path}: 'text_encoder' must be the record of the text encoder the model was "
                               f"trained with (path and identity), got {text_encoder!r}")
    expected = unet_export_config(cfg, vae, weights, text_encoder if cfg.cond.type == "text" else None)
    # Fields added since the export was written read as their defaults, as from_dict reads run_config.
    summary = with_defaults({k: raw.get(k) for k in expected}, unet_export_config(UNetRunConfig(), vae, weights))
    edited = diff_fields(summary, expected)
    if edited:
        raise ModelFolderError(f"{path}: its entries do not match its run_config ({'; '.join(edited[:3])}); "
                               "was it edited? Change run_config instead")
    return UNetExport(folder, cfg, weights, vae, text_encoder if cfg.cond.type == "text" else None)


def load_unet(folder: str | Path, export: Optional[UNetExport] = None) -> Denoiser:
    """Rebuild the stage-2 network (``model.arch``: UNet or DiT) from an exported folder
    (config.json + model.safetensors), in eval mode."""
    export = export or read_unet_export(folder)
    model = build_network(export.config.model, export.config.cond)
    weights = read_folder_weights(Path(folder), read_config(folder))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelFolderError(f"{folder}: weights do not match config.json ({e})") from None
    if missing or unexpected:
        raise ModelFolderError(f"{folder}: weights do not match config.json "
                               f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
