"""Condition encoders for the stage-2 networks (``cond.type``: none | class | mask | text), with a null
condition (learned; for text, the empty prompt's embedding).

A :class:`Conditioner` turns the user's condition into up to three inputs of the network:
an embedding added to the time embedding, cross-attention context tokens (only for a network
that reads them: the UNet; the DiT for text only), and extra input channels concatenated to the latents.
Classifier-free guidance drops whole samples: a dropped sample (``drop[i]`` True) or a missing
condition (``cond=None``) gets the null condition, and the dropped sample's own label, mask or
prompt is never read, so it carries no information into the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from einops import rearrange
from torch import nn

from modules.core.networks.denoiser import Sizes, zero_init
from modules.core.settings import at_most, fraction, non_empty, one_of, positive, setting

WIDTH_LIMIT = 8192          # channels
Encoded = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]


@dataclass
class CondConfig:
    """The condition (``cond.*``): what it is, how often it is dropped, how the network reads it, and
    where text comes from. Its sizes (classes, tokens, image pixels per latent pixel) are
    :class:`modules.core.networks.denoiser.Sizes`, derived from the data, the encoder and the VAE."""
    type: str = setting("none", one_of("none", "class", "mask", "text"))
    drop: float = setting(0.1, fraction())                            # whole-sample dropout (CFG)
    mask_mode: str = setting("crossattn", one_of("crossattn", "concat", "both"))
    mask_channels: int = setting(64, positive, at_most(WIDTH_LIMIT))  # width of the mask encoder
    # Text prompts (README "Text prompts"): a frozen local CLIP text encoder (an SD folder with
    # text_encoder/ + tokenizer/, or one folder holding both); its token embeddings are cached.
    text_encoder: str = ""
    text_layer: str = setting("last", one_of("last", "penultimate"))   # penultimate: SD 2's layer
    text_mode: str = setting("crossattn", one_of("crossattn", "pooled"))   # tokens to cross-attention, or their mean
    caption_column: str = setting("text", non_empty)                  # metadata.jsonl/csv or datasets column
    allow_empty_caption: bool = False                                 # no caption: the empty prompt, not an error


def sincos_position_embedding(height: int, width: int, dim: int, device: torch.device,
                              dtype: torch.dtype) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes ``[height * width, dim]`` (half for rows, half for columns).

    Cross-attention treats its tokens as an unordered set; these codes tell it where each
    mask token sits, at any resolution. ``dim`` must be a multiple of 4 (a config rule).
    """
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    rows = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freqs
    cols = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freqs
    rows = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    cols = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return rearrange(torch.cat([rows, cols], dim=2), "h w d -> (h w) d").to(dtype)


class MaskEncoder(nn.Module):
    """Binary mask ``[B, 1, H, W]`` -> features ``[B, width, H / downsample, W / downsample]``."""

    def __init__(self, width: int, downsample: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.SiLU()]
        for _ in range(downsample.bit_length() - 1):
            layers += [nn.Conv2d(width, width, 3, stride=2, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        self.layers = nn.Sequential(*layers)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return self.layers(mask)


class Conditioner(nn.Module):
    """Encodes ``cond`` for the network: ``forward(cond, drop, batch_size, latent_size) -> (emb_add, context, concat)``.

    - none: ``(None, None, None)``; ``drop`` is ignored (there is nothing to drop).
    - class: ``cond`` is a LongTensor ``[B]`` of labels in ``[0, num_classes)``; label
      ``num_classes`` is the null label. Returns the label embedding ``[B, temb_dim]`` and,
      for a network that ``reads_context``, one context token ``[B, 1, context_dim]``.
    - mask: ``cond`` is a FloatTensor ``[B, 1, H, W]`` at image resolution (1 = foreground),
      ``H = latent height * sizes.image_downsample``. Per ``cond.mask_mode``: context tokens
      ``[B, h * w, context_dim]`` (crossattn), ``concat_channels`` input channels
      ``[B, k, h, w]`` (concat), or both.
    - text: ``cond`` is a FloatTensor ``[B, sizes.text_tokens, sizes.text_width]`` of the frozen text
      encoder's token embeddings (cached; modules/interop/clip.py). The null condition is the
      empty prompt's embedding, the buffer ``null_text`` (saved with the weights; set from the
      latent cache before training). ``cond.text_mode``: the tokens as context (crossattn), or
      their mean through a zero-initialised linear layer added to the embedding (pooled).
    Attributes: ``provides_context`` (the UNet creates cross-attention layers only then)
    and ``concat_channels`` (extra input channels of the network's first layer). A network
    that does not read context tokens gets no layers that make them: DDP refuses parameters
    that take no part in the loss. Mask tokens need such a network (a config rule).
    """

    def __init__(self, cond_cfg: CondConfig, sizes: Sizes, context_dim: int, temb_dim: int, reads_context: bool):
        """``context_dim``: the width of the class and mask context tokens (the network's own); text
        tokens have the encoder's width."""
        super().__init__()
        self.type = cond_cfg.type
        self.num_classes = sizes.num_classes
        self.image_downsample = sizes.image_downsample
        self.context_dim = sizes.text_width if self.type == "text" else context_dim
        self.provides_context = False
        self.concat_channels = 0
        if self.type == "none":
            return
        if self.type == "class":
            self.label_emb = nn.Embedding(sizes.num_classes + 1, temb_dim)
            if reads_context:
                self.to_context = nn.Linear(temb_dim, self.context_dim)
                self.provides_context = True
            return
        if self.type == "text":
            self.register_buffer("null_text", torch.zeros(sizes.text_tokens, sizes.text_width))
            if cond_cfg.text_mode == "pooled":
                self.text_pool = zero_init(nn.Linear(sizes.text_width, temb_dim))
            else:
                self.provides_context = reads_context
            return
        self.encoder = MaskEncoder(cond_cfg.mask_channels, sizes.image_downsample)
        if cond_cfg.mask_mode in ("crossattn", "both"):
            self.to_tokens = nn.Conv2d(cond_cfg.mask_channels, self.context_dim, 1)
            self.null_token = nn.Parameter(torch.randn(self.context_dim) * 0.02)
            self.provides_context = True
        if cond_cfg.mask_mode in ("concat", "both"):
            # As many channels as the latents: enough for a mask, and conv_in stays small.
            self.concat_channels = sizes.latent_channels
            self.to_concat = nn.Conv2d(cond_cfg.mask_channels, self.concat_channels, 1)
            self.null_channels = nn.Parameter(torch.randn(self.concat_channels) * 0.02)

    def forward(self, cond: Optional[torch.Tensor], drop: Optional[torch.Tensor], batch_size: int,
                latent_size: tuple[int, int]) -> Encoded:
        if self.type == "none":
            return None, None, None
        if self.type == "class":
            return self._encode_class(cond, drop, batch_size)
        if self.type == "text":
            return self._encode_text(cond, drop, batch_size)
        return self._encode_mask(cond, drop, batch_size, latent_size)

    def _encode_text(self, tokens: Optional[torch.Tensor], drop: Optional[torch.Tensor], batch_size: int) -> Encoded:
        null = self.null_text
        if tokens is None:
            tokens = null.expand(batch_size, -1, -1)
        else:
            tokens = tokens.to(null.dtype)
            if drop is not None:
                tokens = torch.where(drop[:, None, None], null, tokens)
        if self.provides_context:
            return None, tokens, None
        return self.text_pool(tokens.mean(dim=1)), None, None

    def _encode_class(self, labels: Optional[torch.Tensor], drop: Optional[torch.Tensor], batch_size: int) -> Encoded:
        null = self.num_classes
        if labels is None:
            labels = torch.full((batch_size,), null, dtype=torch.long, device=self.label_emb.weight.device)
        if drop is not None:
            labels = torch.where(drop, null, labels)
        emb = self.label_emb(labels)
        return emb, self.to_context(emb)[:, None, :] if self.provides_context else None, None

    def _encode_mask(self, mask: Optional[torch.Tensor], drop: Optional[torch.Tensor], batch_size: int,
                     latent_size: tuple[int, int]) -> Encoded:
        h, w = latent_size
        tokens = concat = None
        if mask is None:
            if self.provides_context:
                tokens = self.null_token.expand(batch_size, h * w, -1)
            if self.concat_channels:
                concat = self.null_channels[None, :, None, None].expand(batch_size, -1, h, w)
            return None, tokens, concat
        if drop is None:
            # An all-False drop still routes the null parameters into the graph, so DDP sees
            # every parameter used in every step.
            drop = torch.zeros(batch_size, dtype=torch.bool, device=mask.device)
        mask = torch.where(drop[:, None, None, None], 0.0, mask.to(self.encoder.layers[0].weight.dtype))
        features = self.encoder(mask)
        if self.provides_context:
            tokens = rearrange(self.to_tokens(features), "b c h w -> b (h w) c")
            tokens = tokens + sincos_position_embedding(h, w, self.context_dim, tokens.device, tokens.dtype)
            tokens = torch.where(drop[:, None, None], self.null_token.to(tokens.dtype), tokens)
        if self.concat_channels:
            concat = self.to_concat(features)
            concat = torch.where(drop[:, None, None, None], self.null_channels[None, :, None, None].to(concat.dtype),
                                 concat)
        return None, tokens, concat
