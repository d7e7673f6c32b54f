"""A stage-2 network: the in-context-conditioned DiT of improved MeanFlow (Geng, Lu, Wu, Shechtman,
Kolter, He, "Improved Mean Flows: On the Challenges of Fastforward Generative Models", arXiv
2512.02012), as its official JAX code builds it (github.com/Lyy-iiis/imeanflow at bf60cd7,
models/imfDiT.py, embedder.py, torch_models.py; cited as file:line).

No adaLN: every condition is a group of learnable prefix tokens plus that condition's embedding,
broadcast over the group (imfDiT.py:305-309), placed before the patch tokens in the official order
(imfDiT.py:311-321):

    [condition (8) | guidance w (4) | t_min (2) | t_max (2) | step h (4) | time t (4) | patches]

a group only when the network embeds it: class-conditional iMF has the first five and no t. Each
scalar goes through its own embedder, an MLP of the sinusoid of the *raw* value in [0, 1] (no x1000;
embedder.py:33-47, cos first); the guidance scale enters as 1 - 1/w (imfDiT.py:300). The guidance
interval is given in this project's time, [low, high] (t = 0 noise), and embedded as the paper's
(t_min, t_max) = (1 - high, 1 - low), so these embedders mean what the official ones mean.

Blocks (imfDiT.py:68-105): x + g_a * attn(RMSNorm(x)), then x + g_m * SwiGLU(RMSNorm(x)), the gates
g per channel and zero at the start; attention without biases, per-head RMSNorm on q and k, then
RoPE, one-dimensional over the whole sequence (prefix tokens 0..P-1, patches after them in raster
order), rotating interleaved pairs (imfDiT.py:370-385); no absolute positions. SwiGLU hidden width
int(8 d / 3) (2048 at d = 768, 2730 at d = 1024). The final layer is RMSNorm and a zero-initialised
linear on the patch tokens (the prefix is dropped), then unpatchify.

The auxiliary velocity head (``sizes.inputs.velocity_head``, asked for by objective=imf): the first
``depth - aux_head_depth`` blocks are shared; then two stacks of ``aux_head_depth`` blocks, each with
its own final layer, give u (``head="u"``, the default) and v (``head="v"``); ``head="uv"`` returns
both from one forward, the shared blocks run once (imfDiT.py:346-360). Without the head the
``depth`` blocks are one stack. The official B/2 has 89M parameters at inference (its v blocks
left out) and 146M in training; tests/test_imf.py counts ours.

Called as every stage-2 network (:class:`modules.core.networks.denoiser.Denoiser`), plus
``guidance_interval=[B, 2]`` and ``head``; attention goes through
:func:`modules.core.attention.attention`, so the JVP's math backend applies. Conditions: class
labels (label ``num_classes`` the null), masks as concatenated channels (``cond.mask_mode=concat``),
text pooled into the condition tokens (``cond.text_mode=pooled``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.core.attention import attention
from modules.core.networks.denoiser import (EXTRA_INPUTS, WIDTH_LIMIT, CondConfig, Conditioner, Denoiser, Sizes,
                                            zero_init)
from modules.core.settings import at_most, fail, non_negative, one_of, positive, setting

FREQUENCY_CHANNELS = 256    # the condition sinusoid's width (embedder.py:12)
NORM_EPS = 1e-6             # RMSNorm (torch_models.py:77)
ROPE_THETA = 10000.0        # imfDiT.py:370
BLOCK_INIT = 0.32           # block linears start N(0, (0.32 / sqrt(fan_in))^2) (imfDiT.py:158)
HEADS = ("u", "v", "uv")


@dataclass
class ICDiTConfig:
    """``model.*`` of ``model.arch=icdit``; the defaults are iMF-B/2 (imfDiT.py:393-399)."""
    arch: str = "icdit"
    patch_size: int = setting(2, one_of(1, 2, 4, 8))
    hidden_size: int = setting(768, positive, at_most(WIDTH_LIMIT))
    depth: int = setting(12, positive, at_most(256))              # blocks on the path of u
    num_heads: int = setting(12, positive, at_most(1024))
    mlp_hidden: int = setting(0, non_negative, at_most(8 * WIDTH_LIMIT))   # SwiGLU width; 0: int(8 hidden / 3)
    # With a velocity head: the last aux_head_depth blocks are u's own, and v gets as many of its own.
    aux_head_depth: int = setting(8, non_negative, at_most(256))
    # Prefix tokens per condition (imfDiT.py:151-154).
    cond_tokens: int = setting(8, positive, at_most(256))
    guidance_tokens: int = setting(4, positive, at_most(256))
    interval_tokens: int = setting(2, positive, at_most(256))     # each end of the guidance interval
    step_tokens: int = setting(4, positive, at_most(256))         # the interval h (or a shortcut level)
    time_tokens: int = setting(4, positive, at_most(256))         # t, for an objective that embeds it

    @property
    def swiglu_hidden(self) -> int:
        return self.mlp_hidden or 8 * self.hidden_size // 3

    def check(self, prefix: str) -> None:
        if self.hidden_size % self.num_heads:
            raise fail(f"{prefix}num_heads", f"{self.num_heads} does not divide {prefix}hidden_size={self.hidden_size}")
        if (self.hidden_size // self.num_heads) % 2:
            raise fail(f"{prefix}num_heads", f"the head width {self.hidden_size // self.num_heads} must be even "
                       "(RoPE rotates pairs of channels)")
        if self.aux_head_depth > self.depth:
            raise fail(f"{prefix}aux_head_depth", f"{self.aux_head_depth} exceeds {prefix}depth={self.depth}")

    def size_problem(self, sizes: Sizes) -> Optional[str]:
        """Why latents of ``sizes`` do not fit, or None."""
        if sizes.latent_size % self.patch_size:
            return f"model.patch_size={self.patch_size} does not divide the latent size {sizes.latent_size}"
        return None


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension, normalised in at least float32 and
    returned in x's dtype before the weight (torch_models.py:73-88)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS)
        return normed.to(x.dtype) * self.weight


def rope_tables(length: int, head_dim: int, device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[length, head_dim / 2]`` of positions 0..length-1 at frequencies
    theta^(-2i / head_dim) (imfDiT.py:370-376)."""
    freqs = ROPE_THETA ** (-torch.arange(0, head_dim, 2, device=device, dtype=dtype) / head_dim)
    angles = torch.arange(length, device=device, dtype=dtype)[:, None] * freqs[None, :]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[B, heads, N, head_dim]``: each interleaved pair (x[2i], x[2i+1]) as a complex number
    times exp(i angle) (imfDiT.py:379-385), computed in at least float32."""
    pairs = rearrange(x.to(cos.dtype), "... (d two) -> ... d two", two=2)
    real, imag = pairs.unbind(-1)
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rearrange(rotated, "... d two -> ... (d two)").to(x.dtype)


class Attention(nn.Module):
    """Self-attention without biases, per-head RMSNorm on q and k (weights shared by the heads), then
    RoPE (imfDiT.py:22-65)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q = rotate(self.q_norm(q), cos, sin)
        k = rotate(self.k_norm(k), cos, sin)
        # q and k leave the norms in the weights' dtype; attention runs in v's (the run's precision)
        return self.out(rearrange(attention(q.to(v.dtype), k.to(v.dtype), v), "b h n d -> b n (h d)"))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x) without biases (torch_models.py:91-112); w1 and w3 are one layer here."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(dim, 2 * hidden, bias=False)     # rows: w1, then w3
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * value)


class Block(nn.Module):
    """x + g_a * attn(norm(x)), then x + g_m * mlp(norm(x)); the gates per channel, zero at the start."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.attn_gate = nn.Parameter(torch.zeros(dim))
        self.mlp_gate = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin) * self.attn_gate
        return x + self.mlp(self.norm2(x)) * self.mlp_gate


class FinalLayer(nn.Module):
    """RMSNorm and a linear layer to the patch's values, zero at the start (imfDiT.py:108-126)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = zero_init(nn.Linear(dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def raw_sinusoid(value: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(v f_i), sin(v f_i)]`` of the raw value v (no x1000), f_i = max_period^(-i / (dim / 2)):
    ``[B, dim]`` (embedder.py:33-47)."""
    half = dim // 2
    wide = torch.promote_types(value.dtype, torch.float32)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=value.device, dtype=wide) / half)
    args = value.to(wide)[:, None] * freqs[None, :]
    return F.pad(torch.cat([args.cos(), args.sin()], dim=1), (0, dim - 2 * half))


class ConditionEmbedder(nn.Module):
    """A scalar condition in [0, 1]: MLP (Linear, SiLU, Linear) of its raw sinusoid (embedder.py:8-51)."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_CHANNELS, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        first = self.mlp[0]
        return self.mlp(raw_sinusoid(value, first.in_features).to(first.weight.dtype))


# ----------------------------------------------------------------------------- the network

class ICDiT(Denoiser):
    """In-context-conditioned DiT over latents ``[B, latent_channels, h, w]``, h and w divisible by
    ``model.patch_size``; ``forward(..., guidance_interval=None, head="u")``: see the module docstring."""

    Config = ICDiTConfig
    extra_inputs = EXTRA_INPUTS

    @staticmethod
    def condition_problem(cfg: "ICDiTConfig", cond: CondConfig) -> Optional[tuple[str, str]]:
        if cond.type == "mask" and cond.mask_mode != "concat":
            return "cond.mask_mode", ("model.arch=icdit reads masks as concatenated channels only "
                                      f"(cond.mask_mode=concat), got {cond.mask_mode}")
        if cond.type == "text" and cond.text_mode != "pooled":
            return "cond.text_mode", ("model.arch=icdit reads text pooled into its condition tokens only "
                                      f"(cond.text_mode=pooled), got {cond.text_mode}")
        return None

    def __init__(self, cfg: ICDiTConfig, cond_cfg: CondConfig, sizes: Sizes):
        super().__init__(cfg, cond_cfg, sizes)
        m, c, inputs = self.cfg, self.cond_cfg, sizes.inputs
        dim, p = m.hidden_size, m.patch_size
        self.size_factor = p
        self.size_rule = f"model.patch_size={p}"
        self.conditioner = Conditioner(c, sizes, dim, dim, reads_context=False)
        self.patch_embed = nn.Conv2d(sizes.latent_channels + self.conditioner.concat_channels, dim, p, stride=p)

        def tokens(n: int) -> nn.Parameter:
            return nn.Parameter(torch.zeros(n, dim))

        # The prefix groups, in the official order; each None when its input is not embedded.
        self.cond_tokens = tokens(m.cond_tokens) if c.type in ("class", "text") else None
        self.guidance_emb = ConditionEmbedder(dim) if inputs.guidance else None
        self.guidance_tokens = tokens(m.guidance_tokens) if inputs.guidance else None
        self.t_min_emb = ConditionEmbedder(dim) if inputs.guidance_interval else None
        self.t_min_tokens = tokens(m.interval_tokens) if inputs.guidance_interval else None
        self.t_max_emb = ConditionEmbedder(dim) if inputs.guidance_interval else None
        self.t_max_tokens = tokens(m.interval_tokens) if inputs.guidance_interval else None
        self.level_emb = (ConditionEmbedder(dim) if inputs.step == "interval"
                          else nn.Embedding(inputs.levels, dim) if inputs.step == "level" else None)
        self.step_tokens = tokens(m.step_tokens) if self.level_emb is not None else None
        self.time_emb = None if inputs.interval_only else ConditionEmbedder(dim)
        self.time_tokens = None if inputs.interval_only else tokens(m.time_tokens)

        def stack(n: int) -> nn.ModuleList:
            return nn.ModuleList(Block(dim, m.num_heads, m.swiglu_hidden) for _ in range(n))

        head_depth = m.aux_head_depth if inputs.velocity_head else 0
        self.blocks = stack(m.depth - head_depth)           # shared by u and v
        self.u_blocks = stack(head_depth)
        self.v_blocks = stack(head_depth) if inputs.velocity_head else None
        out_dim = p * p * sizes.latent_channels
        self.final = FinalLayer(dim, out_dim)
        self.v_final = FinalLayer(dim, out_dim) if inputs.velocity_head else None
        self._init_weights()

    @property
    def prefix_groups(self) -> list[tuple[str, nn.Parameter]]:
        """The prefix token groups in sequence order, as (name, tokens)."""
        groups = [("cond", self.cond_tokens), ("guidance", self.guidance_tokens), ("t_min", self.t_min_tokens),
                  ("t_max", self.t_max_tokens), ("step", self.step_tokens), ("time", self.time_tokens)]
        return [(name, tokens) for name, tokens in groups if tokens is not None]

    def _init_weights(self) -> None:
        """As the official code: block linears N(0, (0.32 / sqrt(fan_in))^2), condition MLPs
        N(0, 1 / fan_in) with zero biases, tokens and tables N(0, 1 / dim) (imfDiT.py:156-196,
        torch_models.py:20-22, 56-58), the patch projection Xavier-uniform (embedder.py:91-98); the gates
        and the final layers zero, the norms one."""
        dim = self.cfg.hidden_size
        for stack in (self.blocks, self.u_blocks, self.v_blocks):
            for module in (stack.modules() if stack is not None else ()):
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=BLOCK_INIT / math.sqrt(module.in_features))
        for module in (self.guidance_emb, self.t_min_emb, self.t_max_emb, self.level_emb, self.time_emb):
            if isinstance(module, ConditionEmbedder):
                for layer in (module.mlp[0], module.mlp[2]):
                    nn.init.normal_(layer.weight, std=1 / math.sqrt(layer.in_features))
                    nn.init.zeros_(layer.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=1 / math.sqrt(dim))
        for _, tokens in self.prefix_groups:
            nn.init.normal_(tokens, std=1 / math.sqrt(dim))
        if self.cond_cfg.type == "class":
            nn.init.normal_(self.conditioner.label_emb.weight, std=1 / math.sqrt(dim))
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)

    def _prefix(self, batch: int, t: torch.Tensor, step: Optional[torch.Tensor], guidance: Optional[torch.Tensor],
                guidance_interval: Optional[torch.Tensor], cond_emb: Optional[torch.Tensor],
                dtype: torch.dtype) -> list[torch.Tensor]:
        """Each group's tokens plus its condition's embedding, ``[B, n, dim]`` in ``dtype``."""
        values = {"cond": cond_emb}
        if self.guidance_emb is not None:
            values["guidance"] = self.guidance_emb(1 - 1 / guidance)          # imfDiT.py:300
        if self.t_min_emb is not None:     # this project's [low, high] as the paper's (1 - high, 1 - low)
            values["t_min"] = self.t_min_emb(1 - guidance_interval[:, 1])
            values["t_max"] = self.t_max_emb(1 - guidance_interval[:, 0])
        if self.level_emb is not None:
            values["step"] = self.level_emb(step)
        if self.time_emb is not None:
            values["time"] = self.time_emb(t)
        out = []
        for name, tokens in self.prefix_groups:
            emb = values[name]
            group = tokens.expand(batch, -1, -1) if emb is None else tokens + emb[:, None, :]
            out.append(group.to(dtype))
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor] = None,
                interval: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None,
                guidance_interval: Optional[torch.Tensor] = None, head: str = "u"):
        """u (``head="u"``), v (``"v"``) or the pair (``"uv"``), each shaped like ``x``."""
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if head != "u" and self.v_blocks is None:
            raise ValueError(f"head={head!r} needs a velocity head (sizes.inputs.velocity_head), and this network "
                             "has none")
        t = self._check_inputs(x, t, level, interval, cond, drop, guidance, guidance_interval)
        b = x.shape[0]
        cond_emb, _, concat = self.conditioner(cond, drop, b, (x.shape[2], x.shape[3]))
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        patches = self.patch_embed(x)
        grid_h, grid_w = patches.shape[2:]
        patches = rearrange(patches, "b d h w -> b (h w) d")
        step = level if level is not None else interval
        prefix = self._prefix(b, t, step, guidance, guidance_interval, cond_emb, patches.dtype)
        seq = torch.cat(prefix + [patches], dim=1)
        cos, sin = rope_tables(seq.shape[1], self.cfg.hidden_size // self.cfg.num_heads, seq.device,
                               torch.promote_types(seq.dtype, torch.float32))
        for block in self.blocks:
            seq = self._run(block, seq, cos, sin)
        n_prefix = seq.shape[1] - grid_h * grid_w
        outputs = []
        for name, stack, final in (("u", self.u_blocks, self.final), ("v", self.v_blocks, self.v_final)):
            if name not in head:
                continue
            branch = seq
            for block in stack:
                branch = self._run(block, branch, cos, sin)
            out = final(branch[:, n_prefix:])
            # unpatchify: each token holds its p x p patch as (row, column, channel), channel fastest
            outputs.append(rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=grid_h, w=grid_w,
                                     p=self.cfg.patch_size, q=self.cfg.patch_size))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
