"""Stage 1: the KL autoencoder (SD "kl-f8" architecture), its posterior, export and loading.

State-dict layout: ours is diffusers' ``AutoencoderKL`` layout, key for key (``encoder.down_blocks.
{i}.resnets.{j}.conv1.weight``, ``encoder.mid_block.attentions.0.to_q.weight``, ``decoder.
up_blocks.{i}.upsamplers.0.conv.weight`` with up_blocks.0 the lowest resolution, ...), so a
diffusers folder loads after only :func:`convert_diffusers_state_dict` (old attention names,
1x1-conv-shaped attention weights). The original LDM / SD layout (``encoder.down.{i}.block.{j}``,
``mid.attn_1.q``, ``decoder.up.{i}`` with up.0 the highest resolution, ...) is mapped by
:func:`convert_ldm_state_dict`. With ``resample="wavelet"`` the ``downsamplers.0`` /
``upsamplers.0`` entries hold :mod:`modules.wavelet` blocks instead (no pretrained equivalent).

Speed notes (same function as diffusers, cheaper to run):
- GroupNorm under autocast runs in the autocast dtype (statistics still accumulate in fp32
  inside the kernel) instead of autocast's fp32 copy of every activation.
- Nearest 2x upsampling followed by a 3x3 conv is computed as one stride-2 transposed conv
  with a 4x4 kernel folded from the 3x3 weights: 16 instead of 36 multiply-adds per output
  pixel and channel pair, and no 4x-sized intermediate tensor.
- The mid-block self-attention goes through :func:`modules.attention.attention` (xformers/SDPA).

Latents are NOT multiplied by ``config.scale_factor`` here; callers do that.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.attention import attention
from modules.config import ConfigError, VAEModelConfig, from_dict
from modules.export import CONFIG_NAME, ModelFolderError, read_weights, save_model_folder
from modules.wavelet import WaveletDownsample, WaveletUpsample

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_EPS = 1e-6
SD_SCALE_FACTOR = 0.18215
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------- posterior

class DiagonalGaussian:
    """The encoder's posterior N(mean, diag(exp(logvar))), held in float32.

    Built from the ``[B, 2C, h, w]`` moments (mean first, then log-variance, which is clamped
    to [-30, 20]).
    """

    def __init__(self, moments: torch.Tensor):
        mean, logvar = moments.float().chunk(2, dim=1)
        self.mean = mean
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None,
               noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean + std * noise; ``noise`` (standard normal, the latent's shape) is drawn when not given."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                                dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.dtype)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(posterior || N(0, I)) per sample, summed over C, H, W: shape ``[B]``."""
        return 0.5 * (self.mean.square() + self.var - 1.0 - self.logvar).sum(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- layers

class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that stays in autocast's low-precision dtype.

    Autocast runs group_norm in float32, which makes a float32 copy of the input and a float32
    output (kept for the following SiLU's backward) at every norm: the VAE's largest memory and
    bandwidth cost. The CUDA/CPU kernels accumulate statistics in float32 for half inputs, so
    running them in the input dtype loses nothing the next (low-precision) conv would keep.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                    self.eps)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a skip (1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_ch, eps=NORM_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = GroupNorm(groups, out_ch, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, ch, eps=NORM_EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        # A list so the key reads "to_out.0" as in diffusers.
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)           # [B, N, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](attention(q, k, v).squeeze(1))              # [B, N, C]
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """3x3 conv with stride 2 after zero-padding right and bottom by one (LDM's asymmetric pad)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv, computed as one stride-2 transposed conv.

    Along each axis, output pixel 2i sees input pixels i-1 (tap w0) and i (taps w1 + w2), output
    pixel 2i+1 sees i (w0 + w1) and i+1 (w2). A transposed conv with stride 2, padding 1 and the
    4-tap kernel [w2, w1 + w2, w0 + w1, w0] produces exactly that. ``conv.weight`` keeps the
    3x3 layout, so checkpoints are those of the plain upsample-then-conv module.
    """

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)
        fold = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
        self.register_buffer("fold", fold, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fold = self.fold.to(self.conv.weight.dtype)
        kernel = torch.einsum("ky,oiyx,lx->iokl", fold, self.conv.weight, fold)   # [in, out, 4, 4]
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)


def _downsampler(cfg: VAEModelConfig, ch: int) -> nn.Module:
    return WaveletDownsample(ch, ch) if cfg.resample == "wavelet" else Downsample(ch)


def _upsampler(cfg: VAEModelConfig, ch: int) -> nn.Module:
    return WaveletUpsample(ch, ch) if cfg.resample == "wavelet" else Upsample(ch)


class ResolutionBlock(nn.Module):
    """The resnets of one resolution, then an optional resampler (``downsamplers``/``upsamplers``)."""

    def __init__(self, in_ch: int, out_ch: int, num_resnets: int, groups: int,
                 resampler_name: str, resampler: Optional[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_resnets))
        self.resampler_name = resampler_name
        if resampler is not None:
            setattr(self, resampler_name, nn.ModuleList([resampler]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        resamplers = getattr(self, self.resampler_name, None)
        return x if resamplers is None else resamplers[0](x)


class MidBlock(nn.Module):
    """resnet, optional self-attention, resnet at the lowest resolution."""

    def __init__(self, ch: int, groups: int, with_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([SelfAttention(ch, groups)] if with_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


def _widths(cfg: VAEModelConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mult]


class Encoder(nn.Module):
    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        widths = _widths(cfg)
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        prev = widths[0]
        for level, ch in enumerate(widths):
            last = level == len(widths) - 1
            self.down_blocks.append(ResolutionBlock(
                prev, ch, cfg.num_res_blocks, cfg.norm_groups, "downsamplers",
                None if last else _downsampler(cfg, ch)))
            prev = ch
        self.mid_block = MidBlock(widths[-1], cfg.norm_groups, cfg.mid_attention)
        self.conv_norm_out = GroupNorm(cfg.norm_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Mirror of the encoder; ``up_blocks[0]`` works at the lowest resolution (diffusers' order)."""

    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        widths = _widths(cfg)[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], cfg.norm_groups, cfg.mid_attention)
        self.up_blocks = nn.ModuleList()
        prev = widths[0]
        for level, ch in enumerate(widths):
            last = level == len(widths) - 1
            self.up_blocks.append(ResolutionBlock(
                prev, ch, cfg.num_res_blocks + 1, cfg.norm_groups, "upsamplers",
                None if last else _upsampler(cfg, ch)))
            prev = ch
        self.conv_norm_out = GroupNorm(cfg.norm_groups, widths[-1], eps=NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ----------------------------------------------------------------------------- model

def _check_model_config(cfg: VAEModelConfig) -> None:
    if cfg.resample not in ("conv", "wavelet"):
        raise ConfigError(f"config key 'model.resample': {cfg.resample!r} is not one of conv, wavelet")
    if not cfg.channel_mult:
        raise ConfigError("config key 'model.channel_mult': needs at least one level")
    for width in _widths(cfg):
        if width % cfg.norm_groups:
            raise ConfigError(f"config key 'model.norm_groups': {cfg.norm_groups} does not divide "
                              f"the level width {width} (model.base_channels x model.channel_mult)")


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``.

    Images are ``[B, in_channels, H, W]`` in [-1, 1] with H, W divisible by
    ``config.downsample_factor``; latents are ``[B, latent_channels, H / f, W / f]`` unscaled.
    """

    def __init__(self, cfg: VAEModelConfig):
        super().__init__()
        _check_model_config(cfg)
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """The decoder's final conv weight (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.weight

    @staticmethod
    def _check_input(x: torch.Tensor, channels: int, divisor: int, what: str) -> None:
        if x.dim() != 4 or x.shape[1] != channels or x.shape[2] % divisor or x.shape[3] % divisor:
            size_rule = f" with H and W divisible by {divisor}" if divisor > 1 else ""
            raise ValueError(f"AutoencoderKL: expected a [B, {channels}, H, W] {what} tensor{size_rule}, "
                             f"got shape {tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check_input(x, self.config.in_channels, self.config.downsample_factor, "image")
        moments = self.quant_conv(self.encoder(x.to(self.quant_conv.weight.dtype)))
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z, self.config.latent_channels, 1, "latent")
        return self.decoder(self.post_quant_conv(z.to(self.post_quant_conv.weight.dtype)))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None,
                noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


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
            rest = ["mid_block", "resnets", str(int(rest[1][len("block_"):]) - 1)] + tail
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
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    num_levels = _ldm_num_levels(sd)
    out = {}
    for key, value in sd.items():
        new_key = _ldm_key(key, num_levels)
        if new_key is not None:
            out[new_key] = _linear_attention_weight(new_key, value)
    return out


# ----------------------------------------------------------------------------- save / load

def save_vae(model: AutoencoderKL, folder: str | Path, run_config: Optional[dict] = None) -> Path:
    """Write ``folder/config.json`` (kind "vae", the model config, the run config) + ``model.safetensors``."""
    config = {"kind": "vae", "model": dataclasses.asdict(model.config), "run_config": run_config}
    return save_model_folder(folder, model.state_dict(), config)


def _config_from_diffusers(config: dict, where: Path) -> VAEModelConfig:
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
    for field in ("use_quant_conv", "use_post_quant_conv"):
        if not config.get(field, True):
            refuse(field, "models without quant convs (SD3/Flux-style) are not supported")
    if config.get("shift_factor") not in (None, 0, 0.0):
        refuse("shift_factor", "latent shifting is not supported")
    for field in ("latents_mean", "latents_std"):
        if config.get(field) is not None:
            refuse(field, "per-channel latent statistics are not supported")
    return VAEModelConfig(
        in_channels=config.get("in_channels", 3),
        base_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", 4),
        norm_groups=config.get("norm_num_groups", 32),
        mid_attention=config.get("mid_block_add_attention", True),
        scale_factor=float(config.get("scaling_factor", SD_SCALE_FACTOR)),
    )


def _config_from_ldm_weights(sd: dict[str, torch.Tensor], where: Path) -> VAEModelConfig:
    """Read the architecture off converted LDM weights; GroupNorm(32) and SD's scale are assumed."""
    try:
        base = sd["encoder.conv_in.weight"].shape[0]
        num_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
        widths = [sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(num_levels)]
        num_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
        return VAEModelConfig(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            base_channels=base,
            channel_mult=tuple(w // base for w in widths),
            num_res_blocks=num_res,
            latent_channels=sd["post_quant_conv.weight"].shape[0],
            norm_groups=32,
            mid_attention=any(k.startswith("encoder.mid_block.attentions.") for k in sd),
            scale_factor=SD_SCALE_FACTOR,
        )
    except (KeyError, ValueError) as e:
        raise ModelFolderError(f"{where}: not an SD/LDM autoencoder checkpoint (missing {e})") from None


def _load_state(model: AutoencoderKL, sd: dict[str, torch.Tensor], where: Path) -> AutoencoderKL:
    """Strict load with an error that names a few missing / unexpected / mis-shaped keys."""
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
        raise ModelFolderError(f"{where}: weights do not fit the VAE config ({'; '.join(details)})")
    for key, value in expected.items():
        if sd[key].shape != value.shape:
            raise ModelFolderError(f"{where}: weight '{key}' has shape {tuple(sd[key].shape)}, "
                                   f"the config needs {tuple(value.shape)}")
    model.load_state_dict(sd, strict=True)
    return model


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"{path}: invalid JSON ({e})") from None


def _load_diffusers_folder(folder: Path, config: dict) -> AutoencoderKL:
    weights = folder / DIFFUSERS_WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in folder.glob("diffusion_pytorch_model*"))
        hint = f" (found {', '.join(others)}; only .safetensors is accepted)" if others else ""
        raise ModelFolderError(f"{folder}: diffusers AutoencoderKL folder without {DIFFUSERS_WEIGHTS_NAME}{hint}")
    cfg = _config_from_diffusers(config, folder / CONFIG_NAME)
    return _load_state(AutoencoderKL(cfg), convert_diffusers_state_dict(read_weights(weights)), weights)


def _load_ldm_file(path: Path) -> AutoencoderKL:
    raw = read_weights(path)
    try:
        sd = convert_ldm_state_dict(raw)
    except (KeyError, ValueError, IndexError) as e:
        raise ModelFolderError(f"{path}: not an SD/LDM autoencoder checkpoint ({e})") from None
    return _load_state(AutoencoderKL(_config_from_ldm_weights(sd, path)), sd, path)


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
        config = _read_json(path / CONFIG_NAME)
        if config.get("kind") == "vae":
            try:
                cfg = from_dict(VAEModelConfig, config.get("model") or {})
                _check_model_config(cfg)
            except ConfigError as e:
                raise ModelFolderError(f"{path / CONFIG_NAME}: {e}") from None
            model = _load_state(AutoencoderKL(cfg), read_weights(path), path)
        elif config.get("_class_name") == "AutoencoderKL":
            model = _load_diffusers_folder(path, config)
        elif "kind" in config:
            raise ModelFolderError(f"{path}: holds a '{config['kind']}' model, expected a 'vae'")
        else:
            name = config.get("_class_name")
            what = f"a diffusers '{name}'" if name else "an unknown model"
            raise ModelFolderError(f"{path}: {CONFIG_NAME} describes {what}, expected our VAE export "
                                   "(kind 'vae') or a diffusers AutoencoderKL")
    return model.eval()
