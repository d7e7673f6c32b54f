"""A stage-2 network: an SD-style UNet over VAE latents (the others are modules/core/networks/dit.py and icdit.py).

Layout (like Stable Diffusion's): ``conv_in``; per level of ``channel_mult`` ``num_res_blocks``
ResBlocks, each followed by a SpatialTransformer at ``attention_levels``, and a downsample
between levels; a middle ResBlock-SpatialTransformer-ResBlock; the mirrored up path with
``num_res_blocks + 1`` blocks per level fed by skip connections; GroupNorm, SiLU and a
zero-initialised ``conv_out``. ResBlocks take the timestep embedding as a scale and shift
of their second GroupNorm (ADM's "scale-shift norm").

Conditioning of the timestep embedding: sinusoid of ``t * 1000`` (``t`` in [0, 1]) through
an MLP, plus the step-size embedding (shortcut level or MeanFlow interval), the guidance-scale
embedding (intrinsic guidance) and the class embedding when present.
The config (:class:`UNetConfig`, the run config's ``model`` section with ``model.arch=unet``) is
validated where it is built (modules/config/); the network trusts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.core.networks.denoiser import (WIDTH_LIMIT, CondConfig, Conditioner, CrossAttention, Denoiser,
                                            SelfAttention, Sizes, guidance_embedding, step_embedding, zero_init)
from modules.core.settings import (at_most, check_widths, each, fail, fraction, non_empty, non_negative, one_of,
                                   positive, setting)
from modules.core.wavelet import WaveletDownsample, WaveletUpsample


@dataclass
class UNetConfig:
    """``model.*`` of ``model.arch=unet``; the defaults are the seed's network."""
    arch: str = "unet"
    base_channels: int = setting(192, positive, at_most(WIDTH_LIMIT))
    channel_mult: tuple[int, ...] = setting((1, 2, 2, 4, 4, 4), non_empty, each(positive, at_most(64)))
    num_res_blocks: int = setting(2, positive, at_most(64))
    attention_levels: tuple[int, ...] = setting((4, 5), each(non_negative))   # indices into channel_mult
    head_dim: int = setting(32, positive)
    transformer_depth: int = setting(1, positive, at_most(64))
    context_dim: int = setting(256, positive, at_most(WIDTH_LIMIT))   # width of class and mask tokens
    norm_groups: int = setting(32, positive)
    dropout: float = setting(0.0, fraction(high_open=True))
    resample: str = setting("conv", one_of("conv", "wavelet"))

    def check(self, prefix: str) -> None:
        check_widths(prefix, self.base_channels, self.channel_mult, self.norm_groups)
        for m in self.channel_mult:
            if (self.base_channels * m) % self.head_dim:
                raise fail(f"{prefix}head_dim", f"{self.head_dim} does not divide the level width "
                           f"{self.base_channels} x {m} ({prefix}base_channels x {prefix}channel_mult)")
        missing = [lvl for lvl in self.attention_levels if lvl >= len(self.channel_mult)]
        if missing:
            raise fail(f"{prefix}attention_levels", f"level(s) {missing} do not exist "
                       f"({prefix}channel_mult has {len(self.channel_mult)} levels)")

    def size_problem(self, sizes: Sizes) -> Optional[str]:
        """Why latents of ``sizes`` do not fit, or None."""
        factor = 2 ** (len(self.channel_mult) - 1)
        if sizes.latent_size % factor:
            return (f"{len(self.channel_mult)} levels (model.channel_mult) halve the latents {len(self.channel_mult) - 1} "
                    f"times: the latent size {sizes.latent_size} is not divisible by {factor}")
        return None



def _in_float32(norm, x: torch.Tensor, weight, bias) -> torch.Tensor:
    """``norm(x, weight, bias)`` computed in (at least) float32 and returned in ``x``'s dtype.

    CUDA autocast already runs GroupNorm and LayerNorm in float32; CPU autocast feeds them bf16 inputs
    beside float32 weights, and then torch's forward-mode derivative comes out float32 beside a bf16
    output, which the next convolution or linear layer refuses: this is what lets MeanFlow's JVP run
    under mixed precision. In float32 it is the plain norm (and float64 stays float64)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight = None if weight is None else weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    return norm(x.to(dtype), weight, bias).to(x.dtype)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in float32 (as ADM's and LDM's UNets do; :func:`_in_float32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_float32(lambda x, w, b: F.group_norm(x, self.num_groups, w, b, self.eps), x, self.weight, self.bias)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm in float32 (:func:`_in_float32`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _in_float32(lambda x, w, b: F.layer_norm(x, self.normalized_shape, w, b, self.eps), x, self.weight,
                           self.bias)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, timestep scale-shift on the second GroupNorm, SiLU-dropout-conv, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(temb_dim, 2 * out_ch)
        self.norm2 = GroupNorm32(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` is the already SiLU-activated timestep embedding ``[B, temb_dim]``."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = torch.addcmul(shift, self.norm2(h), 1 + scale)   # norm * (1 + scale) + shift, one kernel
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class GEGLU(nn.Module):
    """Feed-forward ``Linear(dim, 2 * 4dim) -> a * gelu(gate) -> Linear(4dim, dim)``."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * F.gelu(gate))


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention (only when there is a context) and GEGLU."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int]):
        super().__init__()
        self.norm1 = LayerNorm32(dim)
        self.attn1 = SelfAttention(dim, heads)
        self.norm2 = LayerNorm32(dim) if context_dim else None
        self.attn2 = CrossAttention(dim, context_dim, heads) if context_dim else None
        self.norm3 = LayerNorm32(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, proj_in, transformer blocks over the ``h * w`` tokens, zero-initialised proj_out, residual."""

    def __init__(self, ch: int, head_dim: int, depth: int, context_dim: Optional[int], groups: int):
        super().__init__()
        self.norm = GroupNorm32(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(BasicTransformerBlock(ch, ch // head_dim, context_dim) for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        h, w = x.shape[2:]
        # NCHW -> tokens [B, h*w, C]: a view, not a copy, when x is channels_last.
        tokens = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        for block in self.blocks:
            tokens = block(tokens, context)
        return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def make_resample(kind: str, direction: str, ch: int) -> nn.Module:
    """``conv`` or ``wavelet`` (Haar DWT with learned sub-band gates) down/up-sampling at width ``ch``."""
    if kind == "wavelet":
        return WaveletDownsample(ch, ch) if direction == "down" else WaveletUpsample(ch, ch)
    return Downsample(ch) if direction == "down" else Upsample(ch)


class LevelBlock(nn.Module):
    """A ResBlock, then a SpatialTransformer at attention levels, then (up path) an upsample."""

    def __init__(self, res: ResBlock, attn: Optional[SpatialTransformer], upsample: Optional[nn.Module] = None):
        super().__init__()
        self.res = res
        self.attn = attn
        self.upsample = upsample

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x, context)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class UNet(Denoiser):
    """The stage-2 UNet, called as every stage-2 network is (:class:`modules.core.networks.denoiser.Denoiser`):
    latents' h and w must be divisible by 2^(levels - 1)."""

    Config = UNetConfig

    @staticmethod
    def condition_problem(cfg: UNetConfig, cond: CondConfig) -> Optional[tuple[str, str]]:
        if cond.type == "mask" and cond.mask_mode != "concat" and cfg.context_dim % 4:
            return "model.context_dim", ("mask tokens need a multiple of 4 (2-D sine-cosine positions), got "
                                         f"{cfg.context_dim}")
        return None

    def __init__(self, cfg: UNetConfig, cond_cfg: CondConfig, sizes: Sizes):
        super().__init__(cfg, cond_cfg, sizes)
        m = self.cfg
        base, groups = m.base_channels, m.norm_groups
        temb_dim = 4 * base
        self.num_levels = len(m.channel_mult)
        self.size_factor = 2 ** (self.num_levels - 1)
        self.size_rule = f"{self.num_levels} levels"

        self.time_mlp = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.level_emb = step_embedding(sizes.inputs, base, temb_dim)
        self.guidance_emb = guidance_embedding(sizes.inputs, base, temb_dim)
        self.conditioner = Conditioner(self.cond_cfg, sizes, m.context_dim, temb_dim, reads_context=True)
        context_dim = self.conditioner.context_dim if self.conditioner.provides_context else None

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, temb_dim, groups, m.dropout)

        def attn(ch: int, level: int) -> Optional[SpatialTransformer]:
            if level not in m.attention_levels:
                return None
            return SpatialTransformer(ch, m.head_dim, m.transformer_depth, context_dim, groups)

        self.conv_in = nn.Conv2d(sizes.latent_channels + self.conditioner.concat_channels, base, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        skip_channels = [base]
        ch = base
        for level, mult in enumerate(m.channel_mult):
            for _ in range(m.num_res_blocks):
                self.down_blocks.append(LevelBlock(res(ch, base * mult), attn(base * mult, level)))
                ch = base * mult
                skip_channels.append(ch)
            if level != self.num_levels - 1:
                self.down_blocks.append(make_resample(m.resample, "down", ch))
                skip_channels.append(ch)

        self.mid_res1 = res(ch, ch)
        self.mid_attn = SpatialTransformer(ch, m.head_dim, m.transformer_depth, context_dim, groups)
        self.mid_res2 = res(ch, ch)

        self.up_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(m.channel_mult))):
            for i in range(m.num_res_blocks + 1):
                upsample = make_resample(m.resample, "up", base * mult) if level and i == m.num_res_blocks else None
                self.up_blocks.append(LevelBlock(res(ch + skip_channels.pop(), base * mult),
                                                 attn(base * mult, level), upsample))
                ch = base * mult

        self.norm_out = GroupNorm32(groups, ch)
        self.conv_out = zero_init(nn.Conv2d(ch, sizes.latent_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor] = None,
                interval: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, emb, context = self._conditioned(x, t, level, interval, cond, drop, guidance)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h = self._run(block, h, emb, context) if isinstance(block, LevelBlock) else block(h)
            skips.append(h)
        h = self._run(self.mid_res1, h, emb)
        h = self._run(self.mid_attn, h, context)
        h = self._run(self.mid_res2, h, emb)
        for block in self.up_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.conv_out(F.silu(self.norm_out(h)))

