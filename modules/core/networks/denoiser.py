"""What the stage-2 networks (unet.py, dit.py) share: the sizes they are built for, the call contract
and its one input check, gradient checkpointing, the time sinusoid, the step-size and guidance
embeddings, zero-initialised layers, self- and cross-attention, and the condition encoders.

Condition encoders (``cond.type``: none | class | mask | text), with a null condition (learned; for
text, the empty prompt's embedding): a :class:`Conditioner` turns the user's condition into up to
three inputs of the network: an embedding added to the time embedding, cross-attention context
tokens (only for a network that reads them: the UNet; the DiT for text only), and extra input
channels concatenated to the latents. Classifier-free guidance drops whole samples: a dropped
sample (``drop[i]`` True) or a missing condition (``cond=None``) gets the null condition, and the
dropped sample's own label, mask or prompt is never read, so it carries no information into the
network.

Every stage-2 network is built as ``Network(cfg, cond, sizes)`` (its own config section, the
condition's, and the :class:`Sizes` that follow from the VAE, the data, the text encoder and the
objective), called as ``net(x, t, level=None, interval=None, cond=None, drop=None, guidance=None)``
and returns a prediction shaped like ``x`` (see :class:`Denoiser`), so objectives, samplers, EMAs,
checkpoints and exports never ask which network they hold.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules.core.attention import attention
from modules.core.settings import (at_most, fail, fraction, non_empty, non_negative, one_of, positive, power_of_two,
                                   setting)

WIDTH_LIMIT = 8192          # channels
Encoded = tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]
TIME_SCALE = 1000.0   # t in [0, 1] is embedded as t * 1000: raw [0, 1] would collapse the sinusoid
STEP_INPUTS = ("none", "level", "interval")
EXTRA_INPUTS = ("interval_only", "guidance_interval", "velocity_head")   # NetworkInputs a network must declare


@dataclass
class NetworkInputs:
    """What the objective asks the network to embed besides the latents and the time.

    ``step``: ``"level"``, a shortcut model's integer step-size level through a table of ``levels``
    entries (the call's ``level``); ``"interval"``, MeanFlow's interval length h in [0, 1], embedded
    like t (the call's ``interval``); ``"none"``. ``guidance``: iSM's guidance scale w as an input.

    Added for improved MeanFlow (all False by default, so sizes recorded before they existed read the
    same): ``interval_only``, the network embeds the interval h and not t (t is still passed, and
    checked, but not read); ``guidance_interval``, the guidance interval [low, high] in this project's
    time as an input (the call's ``guidance_interval``, ``[B, 2]``); ``velocity_head``, an auxiliary
    head that also gives the instantaneous velocity (the call's ``head="v"`` or ``"uv"``). Only a
    network that declares them (:attr:`Denoiser.extra_inputs`) can be built with them.
    """
    step: str = setting("none", one_of(*STEP_INPUTS))
    levels: int = setting(0, non_negative, at_most(1 << 16))
    guidance: bool = False
    interval_only: bool = False
    guidance_interval: bool = False
    velocity_head: bool = False

    def check(self, prefix: str) -> None:
        if self.interval_only and self.step != "interval":
            raise fail(f"{prefix}interval_only", f"needs step=interval (the interval is what is embedded instead of "
                       f"t), got step={self.step}")


@dataclass
class Sizes:
    """What a network is built for besides its own config: sizes that follow from the VAE (latent
    channels, image pixels per latent pixel), the data (latent size, classes), the text encoder (tokens
    and their width) and the objective (:class:`NetworkInputs`). Constructor arguments, derived once
    when a run starts and recorded with its exports (validated like a config when read back); never
    set by hand."""
    latent_channels: int = setting(4, positive, at_most(1024))
    latent_size: int = setting(32, positive, at_most(16384))
    image_downsample: int = setting(8, power_of_two, at_most(256))
    num_classes: int = setting(0, non_negative, at_most(1 << 20))
    text_tokens: int = setting(0, non_negative, at_most(4096))
    text_width: int = setting(0, non_negative, at_most(8192))
    inputs: NetworkInputs = field(default_factory=NetworkInputs)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> torch.Tensor:
    """Sinusoid ``[cos(t * 1000 * f_i), sin(t * 1000 * f_i)]``: ``[B, dim]``, with
    ``f_i = max_period^(-i / (dim // 2 - freq_shift))``.

    ``freq_shift`` 0 is the DiT and ADM code's spacing; 1 is what diffusers' DiT embedder uses
    (``downscale_freq_shift=1``), kept so a converted diffusers DiT computes exactly its function.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - freq_shift))
    # At least float32 (a bf16 t would collapse nearby times); float64 stays float64 (exact derivative checks).
    args = (t.to(torch.promote_types(t.dtype, torch.float32)) * TIME_SCALE)[:, None] * freqs[None, :]
    return F.pad(torch.cat([args.cos(), args.sin()], dim=1), (0, dim - 2 * half))


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias, so the branch it ends starts as a no-op."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ScalarEmbedding(nn.Module):
    """A continuous input embedded like t: MLP of the sinusoid of ``value * 1000``. Its last layer starts
    at zero, so a network given this input starts as the network without it."""

    def __init__(self, frequency_channels: int, dim: int, freq_shift: int = 0):
        super().__init__()
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_channels, dim), nn.SiLU(), zero_init(nn.Linear(dim, dim)))

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        first = self.mlp[0]
        sinusoid = timestep_embedding(value, first.in_features, freq_shift=self.freq_shift)
        return self.mlp(sinusoid.to(first.weight.dtype))


def step_embedding(inputs: NetworkInputs, frequency_channels: int, dim: int,
                   freq_shift: int = 0) -> Optional[nn.Module]:
    """The second time input: a table of shortcut levels, MeanFlow's interval length embedded like t, or None."""
    if inputs.step == "interval":
        return ScalarEmbedding(frequency_channels, dim, freq_shift)
    return nn.Embedding(inputs.levels, dim) if inputs.step == "level" else None


def guidance_embedding(inputs: NetworkInputs, frequency_channels: int, dim: int,
                       freq_shift: int = 0) -> Optional[nn.Module]:
    """iSM's intrinsic guidance: the guidance scale w embedded like t (sinusoid of w * 1000, MLP), or None."""
    return ScalarEmbedding(frequency_channels, dim, freq_shift) if inputs.guidance else None


def output_layer(embedding: nn.Module) -> nn.Module:
    """The layer an embedding ends with (the table itself, or the MLP's last layer), to zero it."""
    return embedding.mlp[-1] if isinstance(embedding, ScalarEmbedding) else embedding


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection (rows: all heads' q, then k, then v)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.out(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to context tokens (fused k/v projection)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return self.out(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


# ----------------------------------------------------------------------------- conditions



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
      latent store before training). ``cond.text_mode``: the tokens as context (crossattn), or
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


# ----------------------------------------------------------------------------- the base class

class Denoiser(nn.Module):
    """Base of the stage-2 networks: ``forward(x, t, level=None, interval=None, cond=None, drop=None,
    guidance=None)`` -> prediction like ``x``.

    x: latents ``[B, sizes.latent_channels, h, w]`` (h, w divisible by ``size_factor``); t: ``[B]`` float
    in [0, 1]; level: ``[B]`` long shortcut step-size level, given iff the network embeds one
    (``sizes.inputs.step == "level"``); interval: ``[B]`` float interval length h in [0, 1], given iff
    the network embeds one (``"interval"``); cond: see :class:`Conditioner`
    (None = null condition for every sample); drop: ``[B]`` bool, True = use the null condition for
    that sample (classifier-free guidance); guidance: ``[B]`` float guidance scale, given iff
    ``sizes.inputs.guidance``. Set ``gradient_checkpointing = True`` to recompute block activations in
    the backward pass. Subclasses set ``time_mlp`` (its first layer's width is the sinusoid's),
    ``level_emb`` (the step input's embedding, a level table or an interval MLP: the name is kept for
    saved weights) and ``guidance_emb`` (:func:`step_embedding`, :func:`guidance_embedding`),
    ``conditioner``, ``size_factor`` and ``size_rule`` (why that factor).
    """

    time_mlp: nn.Sequential
    level_emb: Optional[nn.Module]
    guidance_emb: Optional[nn.Module]
    conditioner: nn.Module
    size_factor: int
    size_rule: str
    time_freq_shift = 0
    # The optional inputs of NetworkInputs (EXTRA_INPUTS) this network can embed; a network is refused
    # sizes asking for another, so an input is never silently ignored.
    extra_inputs: tuple[str, ...] = ()

    @staticmethod
    def condition_problem(cfg, cond: CondConfig) -> Optional[tuple[str, str]]:
        """(config key, why) when this network cannot read the condition as ``cond`` configures it, or None:
        asked where the run config is checked, so it is a config error, never a failure deep in a build."""
        return None

    def __init__(self, cfg, cond_cfg: CondConfig, sizes: Sizes):
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        self.cond_cfg = copy.deepcopy(cond_cfg)
        self.sizes = sizes
        self.gradient_checkpointing = False
        missing = [name for name in EXTRA_INPUTS if getattr(sizes.inputs, name) and name not in self.extra_inputs]
        if missing:
            raise ValueError(f"{type(self).__name__} cannot embed the inputs {', '.join(missing)} that the objective "
                             f"asks for (sizes.inputs: {sizes.inputs})")

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor],
                      interval: Optional[torch.Tensor], cond: Optional[torch.Tensor], drop: Optional[torch.Tensor],
                      guidance: Optional[torch.Tensor],
                      guidance_interval: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The network's one input check (shapes and dtypes only: no device sync), because a wrong
        shape would otherwise fail deep inside torch or, worse, broadcast silently."""
        s, c = self.sizes, self.cond_cfg
        channels, factor = s.latent_channels, self.size_factor
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x must be latents [B, {channels}, h, w] with h and w divisible by {factor} "
                             f"({self.size_rule}), got shape {list(x.shape)}")
        b = x.shape[0]
        problems = []

        def described(value: Optional[torch.Tensor]) -> str:
            return "None" if value is None else f"{value.dtype} of shape {list(value.shape)}"

        if not torch.is_tensor(t) or not t.is_floating_point() or t.shape not in ((), (b,)):
            kind = t.dtype if torch.is_tensor(t) else type(t).__name__
            problems.append(f"t must be a float tensor of shape [{b}] with values in [0, 1], got {kind} of shape "
                            f"{list(getattr(t, 'shape', []))}")
        step = s.inputs.step
        for name, value, wanted in (("level", level, "level"), ("interval", interval, "interval")):
            if step != wanted and value is not None:
                embedded = "no step input" if step == "none" else f"a {step}"
                problems.append(f"{name} given, but this network embeds {embedded}")
        if step == "level" and (level is None or tuple(level.shape) != (b,)
                                or level.dtype not in (torch.int64, torch.int32)):
            problems.append(f"this network embeds the step size ({s.inputs.levels} levels): level must be an integer "
                            f"tensor of shape [{b}], got {described(level)}")
        if step == "interval" and (interval is None or tuple(interval.shape) != (b,)
                                   or not interval.is_floating_point()):
            problems.append(f"this network embeds the interval length: interval must be a float tensor of shape [{b}], "
                            f"got {described(interval)}")
        if (self.guidance_emb is not None) != (guidance is not None) or (
                guidance is not None and (not guidance.is_floating_point() or tuple(guidance.shape) != (b,))):
            problems.append(f"guidance must be a float tensor of shape [{b}] for a network with a guidance input "
                            f"(a shortcut model trained with intrinsic guidance) and None otherwise, got "
                            f"{described(guidance)}")
        if s.inputs.guidance_interval != (guidance_interval is not None) or (
                guidance_interval is not None and (not guidance_interval.is_floating_point()
                                                   or tuple(guidance_interval.shape) != (b, 2))):
            problems.append(f"guidance_interval must be a float tensor of shape [{b}, 2] (low, high) for a network "
                            f"with a guidance-interval input and None otherwise, got {described(guidance_interval)}")
        if c.type == "none" and cond is not None:
            problems.append("this network is unconditional (cond.type=none) but a condition was given")
        if c.type == "class" and cond is not None and (cond.dtype not in (torch.int64, torch.int32)
                                                         or tuple(cond.shape) != (b,)):
            problems.append(f"class condition must be an integer tensor of shape [{b}], got {described(cond)}")
        expected_text = (b, s.text_tokens, s.text_width)
        if c.type == "text" and cond is not None and (not cond.is_floating_point()
                                                        or tuple(cond.shape) != expected_text):
            problems.append(f"text condition must be the text encoder's token embeddings, a float tensor of shape "
                            f"{list(expected_text)} ([B, tokens, width]), got {described(cond)}")
        expected_mask = (b, 1, x.shape[2] * s.image_downsample, x.shape[3] * s.image_downsample)
        if c.type == "mask" and cond is not None and (not cond.is_floating_point()
                                                        or tuple(cond.shape) != expected_mask):
            problems.append(f"mask condition must be a float tensor of shape {list(expected_mask)} (image "
                            f"resolution = latent size x {s.image_downsample}, the VAE's factor), got "
                            f"{described(cond)}")
        if drop is not None and (drop.dtype != torch.bool or tuple(drop.shape) != (b,)):
            problems.append(f"drop must be a bool tensor of shape [{b}], got {described(drop)}")
        if problems:
            raise ValueError("; ".join(problems))
        return t.expand(b)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """MLP of the ``t * 1000`` sinusoid."""
        first = self.time_mlp[0]
        sinusoid = timestep_embedding(t, first.in_features, freq_shift=self.time_freq_shift)
        return self.time_mlp(sinusoid.to(first.weight.dtype))

    def _conditioned(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor],
                     interval: Optional[torch.Tensor], cond: Optional[torch.Tensor], drop: Optional[torch.Tensor],
                     guidance: Optional[torch.Tensor]):
        """The checked inputs as the network body takes them: ``(x, emb, context)``, with ``emb`` the
        SiLU of time + step + guidance + condition embeddings, ``x`` with the mask channels
        concatenated and ``context`` the cross-attention tokens (or None)."""
        t = self._check_inputs(x, t, level, interval, cond, drop, guidance)
        emb = self.time_embedding(t)
        step = level if level is not None else interval
        if self.level_emb is not None:
            emb = emb + self.level_emb(step)
        if self.guidance_emb is not None:
            emb = emb + self.guidance_emb(guidance)
        emb_add, context, concat = self.conditioner(cond, drop, x.shape[0], (x.shape[2], x.shape[3]))
        if emb_add is not None:
            emb = emb + emb_add
        if concat is not None:
            x = torch.cat([x, concat.to(x.dtype)], dim=1)
        return x, F.silu(emb), context

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
