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
(:class:`modules.denoiser.Denoiser`); weights converted from diffusers' ``DiTTransformer2DModel``:
modules/dit_convert.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.core.networks.conditioning import Conditioner, sincos_position_embedding
from modules.config.schema import CondConfig, UNetModelConfig
from modules.core.networks.denoiser import (CrossAttention, Denoiser, SelfAttention, guidance_embedding, output_layer,
                              step_embedding, zero_init)

FREQUENCY_CHANNELS = 256     # width of the time sinusoid fed to the time MLP (the DiT code's)
NORM_EPS = 1e-6


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
    """DiT over latents ``[B, in_channels, h, w]``, h and w divisible by ``model.patch_size``."""

    def __init__(self, model_cfg: UNetModelConfig, cond_cfg: CondConfig):
        super().__init__(model_cfg, cond_cfg)
        m = self.model_cfg
        dim, p = m.hidden_size, m.patch_size
        self.size_factor = p
        self.size_rule = f"model.patch_size={p}"
        self.time_freq_shift = m.time_freq_shift

        self.time_mlp = nn.Sequential(nn.Linear(FREQUENCY_CHANNELS, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.level_emb = step_embedding(m, FREQUENCY_CHANNELS, dim)
        self.guidance_emb = guidance_embedding(m, FREQUENCY_CHANNELS, dim)
        # Cross-attention for text tokens only: labels go through adaLN, masks in as channels.
        self.conditioner = Conditioner(self.cond_cfg, m, dim, reads_context=self.cond_cfg.type == "text")
        context_dim = m.context_dim if self.conditioner.provides_context else None
        self.patch_embed = nn.Conv2d(m.in_channels + self.conditioner.concat_channels, dim, p, stride=p)
        self.blocks = nn.ModuleList(DiTBlock(dim, m.num_heads, int(dim * m.mlp_ratio), context_dim)
                                    for _ in range(m.depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        self.final_proj = nn.Linear(dim, p * p * m.in_channels)
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
                cond: Optional[torch.Tensor] = None, drop: Optional[torch.Tensor] = None,
                guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, c, context = self._conditioned(x, t, level, cond, drop, guidance)
        h = self.patch_embed(x)
        b, dim, grid_h, grid_w = h.shape
        tokens = h.flatten(2).transpose(1, 2)
        tokens = tokens + dit_positions(grid_h, grid_w, dim, tokens.device, tokens.dtype)
        for block in self.blocks:
            tokens = self._run(block, tokens, c, context)
        shift, scale = self.final_modulation(c)[:, None, :].chunk(2, dim=2)
        out = self.final_proj(torch.addcmul(shift, self.norm_out(tokens), 1 + scale))
        # unpatchify: each token holds its p x p patch as (row, column, channel), channel fastest
        p, channels = self.model_cfg.patch_size, self.model_cfg.in_channels
        out = out.reshape(b, grid_h, grid_w, p, p, channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, channels, grid_h * p, grid_w * p)
