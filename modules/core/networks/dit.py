"""A stage-2 network: DiT, the diffusion transformer of Peebles & Xie ("Scalable Diffusion Models
with Transformers", 2023), the backbone of the shortcut paper's tables.

Patchify (a ``p x p`` convolution with stride ``p``) plus fixed 2-D sine-cosine positions;
``depth`` adaLN-Zero blocks (LayerNorm without affine; a shift, a scale and a residual gate for
the attention and for the MLP, all six from the conditioning vector and zero-initialised, so each
block starts as the identity); the final adaLN layer (zero-initialised) and unpatchify. No
learned sigma: flow and shortcut models predict a velocity, DDPM models epsilon.

Conditioning vector c = MLP(sinusoid of ``t * 1000``) + step-size embedding (a shortcut level's
table or a MeanFlow interval's MLP) + guidance-scale embedding (intrinsic guidance), both ending in
zero-initialised layers so a converted pretrained DiT computes its own function at the start,
+ class embedding (label ``num_classes`` is the null label). Masks enter as extra input channels
(``cond.mask_mode=concat``; the config refuses the others). Text (``cond.text_mode``): the token
embeddings through a cross-attention layer in every block, after the self-attention,
unmodulated and with a zero-initialised output (PixArt-alpha's block), or their mean added to c
(pooled). Weights start as the official code initialises them. Called as every stage-2 network
(:class:`modules.core.networks.denoiser.Denoiser`); weights converted from diffusers'
``DiTTransformer2DModel``: modules/interop/dit.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from modules.core.networks.denoiser import (WIDTH_LIMIT, CondConfig, Conditioner, CrossAttention, Denoiser,
                                            SelfAttention, Sizes, guidance_embedding, output_layer,
                                            sincos_position_embedding, step_embedding, zero_init)
from modules.core.settings import at_most, fail, one_of, positive, setting

FREQUENCY_CHANNELS = 256     # width of the time sinusoid fed to the time MLP (the DiT code's)
NORM_EPS = 1e-6


@dataclass
class DiTConfig:
    """``model.*`` of ``model.arch=dit`` (README "DiT"); the defaults are DiT-B/2, the shortcut paper's network."""
    arch: str = "dit"
    patch_size: int = setting(2, one_of(1, 2, 4, 8))              # latent pixels per token side
    hidden_size: int = setting(768, positive, at_most(WIDTH_LIMIT))
    depth: int = setting(12, positive, at_most(256))              # transformer blocks
    num_heads: int = setting(12, positive, at_most(1024))
    mlp_ratio: float = setting(4.0, positive, at_most(64))
    # Time sinusoid spacing: 0 as the DiT code (and the UNet); 1 as diffusers' DiTTransformer2DModel.
    time_freq_shift: int = setting(0, one_of(0, 1))

    def check(self, prefix: str) -> None:
        if self.hidden_size % self.num_heads:
            raise fail(f"{prefix}num_heads", f"{self.num_heads} does not divide {prefix}hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            raise fail(f"{prefix}hidden_size", f"must be a multiple of 4 (2-D sine-cosine positions: sin and "
                       f"cos of rows and columns), got {self.hidden_size}")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise fail(f"{prefix}mlp_ratio", f"{self.mlp_ratio} x {prefix}hidden_size={self.hidden_size} "
                       "leaves the MLP no hidden unit")

    def size_problem(self, sizes: Sizes) -> Optional[str]:
        """Why latents of ``sizes`` do not fit, or None."""
        if sizes.latent_size % self.patch_size:
            return f"model.patch_size={self.patch_size} does not divide the latent size {sizes.latent_size}"
        return None


def dit_positions(height: int, width: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """DiT's fixed position codes ``[height * width, dim]``: columns in the first half, rows in the second
    (the official and diffusers' order), each half ``[sin, cos]``. Computed from the token grid, so
    any latent size divisible by the patch works; under torch.compile it is a constant of the graph."""
    rows_first = sincos_position_embedding(height, width, dim, device, dtype)
    return torch.cat([rows_first[:, dim // 2:], rows_first[:, :dim // 2]], dim=1)


class DiTBlock(nn.Module):
    """adaLN-Zero block: ``x + gate * attn(norm(x) * (1 + scale) + shift)``, then (with a context)
    ``x + cross_attn(x, context)``, then the MLP as the attention."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, context_dim: Optional[int] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.attn = SelfAttention(dim, heads, qkv_bias=True)
        self.cross_attn = CrossAttention(dim, context_dim, heads) if context_dim else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.fc1 = nn.Linear(dim, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, dim)
        self.modulation = zero_init(nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x``: tokens ``[B, N, dim]``; ``c``: the SiLU-activated conditioning vector ``[B, dim]``;
        ``context``: text tokens ``[B, L, context_dim]`` (blocks built with a context width)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)[:, None, :].chunk(6, dim=2)
        x = x + gate_a * self.attn(torch.addcmul(shift_a, self.norm1(x), 1 + scale_a))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, context)
        h = torch.addcmul(shift_m, self.norm2(x), 1 + scale_m)
        return x + gate_m * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


class DiT(Denoiser):
    """DiT over latents ``[B, latent_channels, h, w]``, h and w divisible by ``model.patch_size``."""

    Config = DiTConfig

    @staticmethod
    def condition_problem(cfg: DiTConfig, cond: CondConfig) -> Optional[tuple[str, str]]:
        if cond.type == "mask" and cond.mask_mode != "concat":
            return "cond.mask_mode", ("model.arch=dit has no cross-attention: it reads masks as concatenated input "
                                      f"channels only (cond.mask_mode=concat), got {cond.mask_mode}")
        return None

    def __init__(self, cfg: DiTConfig, cond_cfg: CondConfig, sizes: Sizes):
        super().__init__(cfg, cond_cfg, sizes)
        m = self.cfg
        dim, p = m.hidden_size, m.patch_size
        self.size_factor = p
        self.size_rule = f"model.patch_size={p}"
        self.time_freq_shift = m.time_freq_shift

        self.time_mlp = nn.Sequential(nn.Linear(FREQUENCY_CHANNELS, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.level_emb = step_embedding(sizes.inputs, FREQUENCY_CHANNELS, dim, m.time_freq_shift)
        self.guidance_emb = guidance_embedding(sizes.inputs, FREQUENCY_CHANNELS, dim, m.time_freq_shift)
        # Cross-attention for text tokens only: labels go through adaLN, masks in as channels.
        self.conditioner = Conditioner(self.cond_cfg, sizes, sizes.text_width, dim,
                                       reads_context=self.cond_cfg.type == "text")
        context_dim = sizes.text_width if self.conditioner.provides_context else None
        self.patch_embed = nn.Conv2d(sizes.latent_channels + self.conditioner.concat_channels, dim, p, stride=p)
        self.blocks = nn.ModuleList(DiTBlock(dim, m.num_heads, int(dim * m.mlp_ratio), context_dim)
                                    for _ in range(m.depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.final_proj = nn.Linear(dim, p * p * sizes.latent_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """As the DiT code: Xavier-uniform linear layers and patch projection, N(0, 0.02) time MLP and
        label table; zero modulations, final layer, text pooling and the last layer of the step-size and
        guidance embeddings (their first layers as the time MLP's)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:     # cross-attention's q and kv have none
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.cond_cfg.type == "class":
            nn.init.normal_(self.conditioner.label_emb.weight, std=0.02)
        for block in self.blocks:
            zero_init(block.modulation)
            if block.cross_attn is not None:
                zero_init(block.cross_attn.out)     # PixArt-alpha: each block starts without the text
        for layer in (self.final_modulation, self.final_proj):
            zero_init(layer)
        for embedding in (self.level_emb, self.guidance_emb):
            if embedding is None:
                continue
            if embedding is not output_layer(embedding):
                nn.init.normal_(embedding.mlp[0].weight, std=0.02)
            zero_init(output_layer(embedding))
        if hasattr(self.conditioner, "text_pool"):
            zero_init(self.conditioner.text_pool)

    def forward(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor] = None,
                interval: Optional[torch.Tensor] = None, cond: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None, guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, c, context = self._conditioned(x, t, level, interval, cond, drop, guidance)
        h = self.patch_embed(x)
        grid_h, grid_w = h.shape[2:]
        tokens = rearrange(h, "b d h w -> b (h w) d")
        tokens = tokens + dit_positions(grid_h, grid_w, tokens.shape[2], tokens.device, tokens.dtype)
        for block in self.blocks:
            tokens = self._run(block, tokens, c, context)
        shift, scale = self.final_modulation(c)[:, None, :].chunk(2, dim=2)
        out = self.final_proj(torch.addcmul(shift, self.norm_out(tokens), 1 + scale))
        # unpatchify: each token holds its p x p patch as (row, column, channel), channel fastest
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=grid_h, w=grid_w, p=self.cfg.patch_size,
                         q=self.cfg.patch_size)
