"""Stage 1: the KL autoencoder network (SD "kl-f8" architecture) and its posterior.

State-dict layout: ours is diffusers' ``AutoencoderKL`` layout, key for key (``encoder.down_blocks.
{i}.resnets.{j}.conv1.weight``, ``encoder.mid_block.attentions.0.to_q.weight``, ``decoder.
up_blocks.{i}.upsamplers.0.conv.weight`` with up_blocks.0 the lowest resolution, ...), so
pretrained weights load after a key conversion (:mod:`modules.interop.vae`). With
``resample="wavelet"`` the ``downsamplers.0`` / ``upsamplers.0`` entries hold
:mod:`modules.core.wavelet` blocks instead (no pretrained equivalent).

Speed notes (same function as diffusers, cheaper to run):
- GroupNorm under autocast runs in the autocast dtype (statistics still accumulate in fp32
  inside the kernel) instead of autocast's fp32 copy of every activation.
- Nearest 2x upsampling followed by a 3x3 conv is computed as one stride-2 transposed conv
  with a 4x4 kernel folded from the 3x3 weights: 16 instead of 36 multiply-adds per output
  pixel and channel pair, and no 4x-sized intermediate tensor.
- The mid-block self-attention goes through :func:`modules.core.attention.attention` (xformers/SDPA).

Latents leave ``encode`` and enter ``decode`` raw; :meth:`AutoencoderKL.normalize` and
:meth:`AutoencoderKL.denormalize` map them to and from the space stage 2 models (``scale_factor``,
``shift_factor``, per-channel ``latents_mean`` / ``latents_std``: diffusers' formulas).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from modules.core.attention import attention
from modules.core.settings import at_most, check_widths, each, fail, non_empty, one_of, positive, setting
from modules.core.wavelet import WaveletDownsample, WaveletUpsample

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
NORM_EPS = 1e-6


@dataclass
class VAEConfig:
    """``model.*`` of a VAE run; the defaults are SD's kl-f8."""
    in_channels: int = setting(3, positive, at_most(64))
    base_channels: int = setting(128, positive, at_most(8192))
    channel_mult: tuple[int, ...] = setting((1, 2, 4, 4), non_empty, each(positive, at_most(64)))
    num_res_blocks: int = setting(2, positive, at_most(64))
    latent_channels: int = setting(4, positive, at_most(1024))
    norm_groups: int = setting(32, positive)
    mid_attention: bool = True
    resample: str = setting("conv", one_of("conv", "wavelet"))
    # What stage 2 models: (z - shift_factor - latents_mean) * scale_factor / latents_std (normalize). The
    # scale is measured after stage 1 (1 / std); SD3 and FLUX VAEs shift, SDXL-style configs (Playground,
    # EDM2 and iMF's SD-VAE statistics) give per-channel means and stds; () is none.
    scale_factor: float = setting(1.0, positive)
    shift_factor: float = 0.0
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = setting((), each(positive))
    # The 1x1 convs around the latent (SD's VAEs have them, SD3's and FLUX's do not).
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def check(self, prefix: str) -> None:
        check_widths(prefix, self.base_channels, self.channel_mult, self.norm_groups)
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if values and len(values) != self.latent_channels:
                raise fail(f"{prefix}{name}", f"{len(values)} values for {prefix}latent_channels="
                           f"{self.latent_channels}: give one per channel")
        if bool(self.latents_mean) != bool(self.latents_std):
            given, missing = ("latents_mean", "latents_std") if self.latents_mean else ("latents_std", "latents_mean")
            raise fail(f"{prefix}{missing}", f"{prefix}{given} is given: per-channel statistics need both")
        if self.latents_mean and self.shift_factor:
            raise fail(f"{prefix}shift_factor", f"{self.shift_factor} with {prefix}latents_mean given: the latents "
                       "are centred one way (per-channel means, or one shift), not both")


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
        h, w = x.shape[2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b 1 (h w) c")    # one head
        q, k, v = (proj(tokens) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](rearrange(attention(q, k, v), "b 1 n c -> b n c"))
        return x + rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


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


def _downsampler(cfg: VAEConfig, ch: int) -> nn.Module:
    return WaveletDownsample(ch, ch) if cfg.resample == "wavelet" else Downsample(ch)


def _upsampler(cfg: VAEConfig, ch: int) -> nn.Module:
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


def _widths(cfg: VAEConfig) -> list[int]:
    return [cfg.base_channels * m for m in cfg.channel_mult]


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
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

    def __init__(self, cfg: VAEConfig):
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

class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``.

    Images are ``[B, in_channels, H, W]`` in [-1, 1] with H, W divisible by
    ``config.downsample_factor``; latents are ``[B, latent_channels, H / f, W / f]``, raw (``normalize``
    gives what stage 2 models).
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        self._channel_tables: dict[tuple, torch.Tensor] = {}     # per-channel statistics, see _per_channel

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
        moments = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        return DiagonalGaussian(moments if self.quant_conv is None else self.quant_conv(moments))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z, self.config.latent_channels, 1, "latent")
        z = z.to(self.decoder.conv_in.weight.dtype)
        return self.decoder(z if self.post_quant_conv is None else self.post_quant_conv(z))

    def _per_channel(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        # made once per dtype and device: a host-to-device copy in every training step would wait for the GPU
        key = (values, like.dtype, like.device)
        if key not in self._channel_tables:
            self._channel_tables[key] = torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return self._channel_tables[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> what stage 2 models: ``(z - shift_factor) * scale_factor`` (SD, SD3, FLUX), or
        ``(z - latents_mean) * scale_factor / latents_std`` with per-channel statistics (SDXL-style configs).
        Only the operations a config asks for are applied, so SD-style latents are ``z * scale_factor`` exactly."""
        c = self.config
        if c.latents_mean:
            z = z - self._per_channel(c.latents_mean, z)
        elif c.shift_factor:
            z = z - c.shift_factor
        z = z * c.scale_factor
        return z / self._per_channel(c.latents_std, z) if c.latents_std else z

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`normalize`: what ``decode`` takes (diffusers' pipelines' order of operations)."""
        c = self.config
        if c.latents_std:
            x = x * self._per_channel(c.latents_std, x)
        x = x / c.scale_factor
        if c.latents_mean:
            return x + self._per_channel(c.latents_mean, x)
        return x + c.shift_factor if c.shift_factor else x

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: Optional[torch.Generator] = None,
                noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
