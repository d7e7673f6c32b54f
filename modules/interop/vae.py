"""Loading VAEs: our exports (modules/run/export.py), diffusers ``AutoencoderKL`` folders, SD/LDM single files.

Every diffusers ``AutoencoderKL`` of today's latent models loads: SD 1.x/2.x and SDXL (4 channels,
``scaling_factor``; SDXL-style configs with per-channel ``latents_mean``/``latents_std``), SD3 and FLUX
(16 channels, ``shift_factor``, no quant convs). Their normalisation becomes the VAE config's
(:meth:`AutoencoderKL.normalize`). DC-AE (``AutoencoderDC``) is another network and is refused.

Our layout is diffusers' current one, so a diffusers folder loads after only
:func:`convert_diffusers_state_dict` (old attention names, 1x1-conv-shaped attention weights).
The original LDM / SD layout (``encoder.down.{i}.block.{j}``, ``mid.attn_1.q``, ``decoder.up.{i}``
with up.0 the highest resolution, ...) is mapped by :func:`convert_ldm_state_dict`. Weights are
only ever read from safetensors. Errors are :class:`ModelFolderError` naming the path.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from modules.config.io import read_json
from modules.core.networks.vae import AutoencoderKL, VAEConfig
from modules.errors import ModelFolderError
from modules.run.export import (CONFIG_NAME, DIFFUSERS_WEIGHTS_NAME, describe_kind, load_our_vae, load_state_strict,
                                read_weights, vae_config)

SD_SCALE_FACTOR = 0.18215
VAE_CONFIG = "the VAE config"


# ----------------------------------------------------------------------------- key conversion

_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _linear_attention_weight(key: str, value: torch.Tensor) -> torch.Tensor:
    """Attention projections stored as 1x1 convs ([C, C, 1, 1] or [C, C, 1]) become Linear [C, C]."""
    if ".attentions." in key and key.endswith(".weight") and value.dim() > 2 and "group_norm" not in key:
        return value.reshape(value.shape[0], value.shape[1])
    return value


def convert_diffusers_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``AutoencoderKL`` state dict (current or pre-0.14 attention names) in our layout.

    Our layout is diffusers' current one; older checkpoints (e.g. the hub's sd-vae-ft-mse) name
    the attention projections ``query/key/value/proj_attn``, sometimes as 1x1-conv weights.
    """
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION_NAMES and ".attentions." in key:
            key = ".".join(parts[:-2] + [_DEPRECATED_ATTENTION_NAMES[parts[-2]], parts[-1]])
        out[key] = _linear_attention_weight(key, value)
    return out


_LDM_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LDM_RESNET_NAMES = {"nin_shortcut": "conv_shortcut"}
_LDM_TOP_NAMES = {"norm_out": "conv_norm_out"}
# Prefixes of non-VAE entries in LDM checkpoints: the training loss's parameters (LPIPS,
# discriminator, learned logvar) are saved alongside the autoencoder in LDM's VAE checkpoints.
_LDM_IGNORED_PREFIXES = ("loss.",)


def _ldm_num_levels(sd: dict[str, torch.Tensor]) -> int:
    levels = {int(m.group(1)) for k in sd for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m}
    if not levels:
        raise KeyError("no 'encoder.down.<i>.' keys: not an LDM/SD autoencoder state dict")
    return max(levels) + 1


def _ldm_key(key: str, num_levels: int) -> Optional[str]:
    """Our name for one LDM key, or None for keys of the training loss."""
    if key.startswith(_LDM_IGNORED_PREFIXES):
        return None
    parts = key.split(".")
    side = parts[0]
    if side not in ("encoder", "decoder"):
        return key                                            # quant_conv, post_quant_conv
    rest = parts[1:]
    if rest[0] in ("down", "up"):
        level = int(rest[1])
        # LDM numbers decoder levels from the highest resolution; diffusers from the lowest.
        index = level if rest[0] == "down" else num_levels - 1 - level
        group = "down_blocks" if rest[0] == "down" else "up_blocks"
        if rest[2] == "block":
            tail = [_LDM_RESNET_NAMES.get(rest[4], rest[4])] + rest[5:]
            rest = [group, str(index), "resnets", rest[3]] + tail
        elif rest[2] in ("downsample", "upsample"):
            rest = [group, str(index), rest[2] + "rs", "0"] + rest[3:]
    elif rest[0] == "mid":
        if rest[1].startswith("block_"):
            tail = [_LDM_RESNET_NAMES.get(rest[2], rest[2])] + rest[3:]
            rest = ["mid_block", "resnets", str(int(rest[1].removeprefix("block_")) - 1)] + tail
        elif rest[1] == "attn_1":
            rest = ["mid_block", "attentions", "0", _LDM_ATTENTION_NAMES.get(rest[2], rest[2])] + rest[3:]
    else:
        rest = [_LDM_TOP_NAMES.get(rest[0], rest[0])] + rest[1:]
    return ".".join([side] + rest)


def convert_ldm_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original LDM / SD first-stage state dict (``encoder.down.0.block.0.norm1.weight``, ...,
    optionally prefixed ``first_stage_model.`` as inside a full SD checkpoint) in our layout."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    num_levels = _ldm_num_levels(sd)
    out = {}
    for key, value in sd.items():
        new_key = _ldm_key(key, num_levels)
        if new_key is not None:
            out[new_key] = _linear_attention_weight(new_key, value)
    return out


# ----------------------------------------------------------------------------- load

def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _config_from_diffusers(config: dict, where: Path) -> VAEConfig:
    """Map a diffusers ``AutoencoderKL`` config.json onto ours; refuse what we cannot represent."""
    def refuse(field: str, why: str):
        raise ModelFolderError(f"{where}: diffusers config field '{field}' = {config.get(field)!r}: {why}")

    widths = list(config.get("block_out_channels", (64,)))
    base = widths[0]
    if any(w % base for w in widths):
        refuse("block_out_channels", f"every width must be a multiple of the first ({base})")
    for field, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if any(t != allowed for t in config.get(field, (allowed,))):
            refuse(field, f"only {allowed} blocks are supported")
    if config.get("act_fn", "silu") != "silu":
        refuse("act_fn", "only silu is supported")
    if config.get("out_channels", config.get("in_channels", 3)) != config.get("in_channels", 3):
        refuse("out_channels", "must equal in_channels")
    statistics = {}
    for field in ("latents_mean", "latents_std"):
        value = config.get(field)
        if value is not None:
            if not isinstance(value, (list, tuple)) or not all(_is_number(v) for v in value):
                refuse(field, "must be a list of numbers, one per latent channel")
            statistics[field] = list(value)
    shift = config.get("shift_factor")
    if shift is not None and not _is_number(shift):
        refuse("shift_factor", "must be a number")
    return vae_config(dict(
        in_channels=config.get("in_channels", 3),
        base_channels=base,
        channel_mult=[w // base for w in widths],
        num_res_blocks=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        scale_factor=config.get("scaling_factor", SD_SCALE_FACTOR),
        shift_factor=shift or 0.0,
        **statistics,
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
    ), where)


def _config_from_ldm_weights(sd: dict[str, torch.Tensor], where: Path) -> VAEConfig:
    """Read the architecture off converted LDM weights; GroupNorm(32) and SD's scale are assumed."""
    try:
        base = sd["encoder.conv_in.weight"].shape[0]
        num_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
        widths = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(num_levels)]
        num_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
        values = dict(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            base_channels=base,
            channel_mult=[w // base for w in widths],
            num_res_blocks=num_res,
            latent_channels=sd["post_quant_conv.weight"].shape[0],
            norm_groups=32,
            mid_attention=any(k.startswith("encoder.mid_block.attentions.") for k in sd),
            scale_factor=SD_SCALE_FACTOR,
        )
    except (KeyError, ValueError) as e:
        raise ModelFolderError(f"{where}: not an SD/LDM autoencoder checkpoint (missing {e})") from None
    return vae_config(values, where)


def _load_diffusers_folder(folder: Path, config: dict) -> AutoencoderKL:
    weights = folder / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
        hint = f" (found {', '.join(others)}; only .safetensors is accepted)" if others else ""
        raise ModelFolderError(f"{folder}: diffusers AutoencoderKL folder without {DIFFUSERS_WEIGHTS_NAME}{hint}")
    cfg = _config_from_diffusers(config, folder / CONFIG_NAME)
    state = convert_diffusers_state_dict(read_weights(weights))
    return load_state_strict(AutoencoderKL(cfg), state, weights, VAE_CONFIG)


def _load_ldm_file(path: Path) -> AutoencoderKL:
    raw = read_weights(path)
    try:
        sd = convert_ldm_state_dict(raw)
    except (KeyError, ValueError, IndexError) as e:
        raise ModelFolderError(f"{path}: not an SD/LDM autoencoder checkpoint ({e})") from None
    return load_state_strict(AutoencoderKL(_config_from_ldm_weights(sd, path)), sd, path, VAE_CONFIG)


def load_vae(path: str | Path) -> AutoencoderKL:
    """Load a VAE from our exported folder, a diffusers ``AutoencoderKL`` folder (or a diffusers
    pipeline folder with a ``vae/`` sub-folder) or a single SD/LDM-format ``.safetensors`` file.

    A ``train_vae.py`` output dir loads its ``vae/`` export. Returns the model in eval mode,
    on CPU, in float32. Errors are :class:`ModelFolderError` naming the path.
    """
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"{path}: does not exist (expected a VAE folder or a .safetensors file)")
    if path.is_file():
        model = _load_ldm_file(path)
    else:
        if (path / "vae" / CONFIG_NAME).is_file():
            path = path / "vae"
        if not (path / CONFIG_NAME).is_file():
            raise ModelFolderError(f"{path}: no {CONFIG_NAME}; expected an exported VAE folder, a diffusers "
                                   "AutoencoderKL folder or an SD-format .safetensors file")
        config = read_json(path / CONFIG_NAME, ModelFolderError)
        if not isinstance(config, dict):
            raise ModelFolderError(f"{path / CONFIG_NAME}: expected a JSON object, got {type(config).__name__}")
        if config.get("kind") == "vae":
            model = load_our_vae(path, config)
        elif config.get("_class_name") == "AutoencoderKL":
            model = _load_diffusers_folder(path, config)
        elif config.get("_class_name") == "AutoencoderDC":
            raise ModelFolderError(f"{path}: a DC-AE (diffusers AutoencoderDC) is not supported: it is another "
                                   "network (deterministic latents, linear-attention blocks, f32 to f128), not a KL "
                                   "autoencoder; use an AutoencoderKL (SD, SDXL, SD3, FLUX) or train one")
        elif "kind" in config:
            raise ModelFolderError(f"{path}: {CONFIG_NAME} holds {describe_kind(config)}, expected a 'vae'")
        else:
            name = config.get("_class_name")
            what = f"a diffusers '{name}'" if name else "an unknown model"
            raise ModelFolderError(f"{path}: {CONFIG_NAME} describes {what}, expected our VAE export "
                                   "(kind 'vae') or a diffusers AutoencoderKL")
    return model.eval()
