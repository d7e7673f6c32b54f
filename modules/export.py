"""Model folders: ``config.json`` + ``model.safetensors`` (like diffusers' save_pretrained).

Weights are only ever read from safetensors, so nothing is unpickled from a user's file.
Folders are written into a temporary sibling and renamed, so a crash never leaves a
half-written export under the final name.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ModelFolderError(ValueError):
    """A model folder that is missing, incomplete or of the wrong kind."""


def save_model_folder(folder: str | Path, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, tmp / WEIGHTS_NAME)
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


def read_config(folder: str | Path, kind: str | None = None) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no {CONFIG_NAME}; expected an exported model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: invalid JSON ({e})") from None
    if kind is not None and config.get("kind") != kind:
        raise ModelFolderError(f"{folder}: holds a '{config.get('kind')}' model, expected a '{kind}'")
    return config


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else is refused rather than unpickled."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise ModelFolderError(f"{path}: weights file not found")
    if path.suffix != ".safetensors":
        raise ModelFolderError(f"{path}: only .safetensors weights are accepted "
                               "(pickle-based .ckpt/.bin/.pt files can run code when loaded)")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ModelFolderError(f"{path}: not a readable safetensors file ({e})") from None


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
