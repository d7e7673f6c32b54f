"""A stage-2 network: an SD-style UNet over VAE latents (the other is modules/dit.py).

Layout (like Stable Diffusion's): ``conv_in``; per level of ``channel_mult`` ``num_res_blocks``
ResBlocks, each followed by a SpatialTransformer at ``attention_levels``, and a downsample
between levels; a middle ResBlock-SpatialTransformer-ResBlock; the mirrored up path with
``num_res_blocks + 1`` blocks per level fed by skip connections; GroupNorm, SiLU and a
zero-initialised ``conv_out``. ResBlocks take the timestep embedding as a scale and shift
of their second GroupNorm (ADM's "scale-shift norm").

Conditioning of the timestep embedding: sinusoid of ``t * 1000`` (``t`` in [0, 1]) through
an MLP, plus the step-size embedding (shortcut level or MeanFlow interval), the guidance-scale
embedding (intrinsic guidance) and the class embedding when present.
Models are saved as folders (``config.json`` + ``model.safetensors``, see modules/export.py).
The configs are validated where they are built (modules/config.py); the network trusts them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.core.networks.conditioning import Conditioner
from modules.config.schema import CondConfig, UNetModelConfig
from modules.core.networks.denoiser import CrossAttention, Denoiser, SelfAttention, guidance_embedding, step_embedding, zero_init
from modules.core.wavelet import WaveletDownsample, WaveletUpsample


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
        b, c, h, w = x.shape
        # NCHW -> tokens [B, h*w, C]: a view, not a copy, when x is channels_last.
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(tokens).reshape(b, h, w, c).permute(0, 3, 1, 2)


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
    """The stage-2 UNet, called as every stage-2 network is (:class:`modules.denoiser.Denoiser`):
    latents' h and w must be divisible by 2^(levels - 1)."""

    def __init__(self, model_cfg: UNetModelConfig, cond_cfg: CondConfig):
        super().__init__(model_cfg, cond_cfg)
        m = self.model_cfg
        base, groups = m.base_channels, m.norm_groups
        temb_dim = 4 * base
        self.num_levels = len(m.channel_mult)
        self.size_factor = 2 ** (self.num_levels - 1)
        self.size_rule = f"{self.num_levels} levels"

        self.time_mlp = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.level_emb = step_embedding(m, base, temb_dim)
        self.guidance_emb = guidance_embedding(m, base, temb_dim)
        self.conditioner = Conditioner(self.cond_cfg, m, temb_dim, reads_context=True)
        context_dim = m.context_dim if self.conditioner.provides_context else None

        def res(in_ch: int, out_ch: int) -> ResBlock:
            return ResBlock(in_ch, out_ch, temb_dim, groups, m.dropout)

        def attn(ch: int, level: int) -> Optional[SpatialTransformer]:
            if level not in m.attention_levels:
                return None
            return SpatialTransformer(ch, m.head_dim, m.transformer_depth, context_dim, groups)

        self.conv_in = nn.Conv2d(m.in_channels + self.conditioner.concat_channels, base, 3, padding=1)
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
        self.conv_out = zero_init(nn.Conv2d(ch, m.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor] = None,
                cond: Optional[torch.Tensor] = None, drop: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, emb, context = self._conditioned(x, t, level, cond, drop, guidance)
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


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
