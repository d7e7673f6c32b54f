"""What the stage-2 networks (unet.py, dit.py) share: the sizes they are built for, the call contract
and its one input check, gradient checkpointing, the time sinusoid, the step-size and guidance
embeddings, zero-initialised layers, self- and cross-attention.

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
from torch import nn
from torch.utils.checkpoint import checkpoint

from einops import rearrange

from modules.core.attention import attention
from modules.core.settings import at_most, non_negative, one_of, positive, power_of_two, setting

TIME_SCALE = 1000.0   # t in [0, 1] is embedded as t * 1000: raw [0, 1] would collapse the sinusoid
STEP_INPUTS = ("none", "level", "interval")


@dataclass
class NetworkInputs:
    """What the objective asks the network to embed besides the latents and the time.

    ``step``: ``"level"``, a shortcut model's integer step-size level through a table of ``levels``
    entries (the call's ``level``); ``"interval"``, MeanFlow's interval length h in [0, 1], embedded
    like t (the call's ``interval``); ``"none"``. ``guidance``: iSM's guidance scale w as an input.
    """
    step: str = setting("none", one_of(*STEP_INPUTS))
    levels: int = setting(0, non_negative, at_most(1 << 16))
    guidance: bool = False


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


def step_embedding(inputs: NetworkInputs, frequency_channels: int, dim: int, freq_shift: int = 0) -> Optional[nn.Module]:
    """The second time input: a table of shortcut levels, MeanFlow's interval length embedded like t, or None."""
    if inputs.step == "interval":
        return ScalarEmbedding(frequency_channels, dim, freq_shift)
    return nn.Embedding(inputs.levels, dim) if inputs.step == "level" else None


def guidance_embedding(inputs: NetworkInputs, frequency_channels: int, dim: int, freq_shift: int = 0) -> Optional[nn.Module]:
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


class Denoiser(nn.Module):
    """Base of the stage-2 networks: ``forward(x, t, level=None, interval=None, cond=None, drop=None,
    guidance=None)`` -> prediction like ``x``.

    x: latents ``[B, sizes.latent_channels, h, w]`` (h, w divisible by ``size_factor``); t: ``[B]`` float
    in [0, 1]; level: ``[B]`` long shortcut step-size level, given iff the network embeds one
    (``sizes.inputs.step == "level"``); interval: ``[B]`` float interval length h in [0, 1], given iff
    the network embeds one (``"interval"``); cond: see :class:`modules.core.networks.conditioning.Conditioner`
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

    def __init__(self, cfg, cond_cfg, sizes: Sizes):
        """``cfg``: the network's own config; ``cond_cfg``: the condition's (``cond.*``)."""
        super().__init__()
        self.cfg = copy.deepcopy(cfg)
        self.cond_cfg = copy.deepcopy(cond_cfg)
        self.sizes = sizes
        self.gradient_checkpointing = False

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor],
                      interval: Optional[torch.Tensor], cond: Optional[torch.Tensor], drop: Optional[torch.Tensor],
                      guidance: Optional[torch.Tensor]) -> torch.Tensor:
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
            problems.append(f"t must be a float tensor of shape [{b}] with values in [0, 1], got "
                            f"{t.dtype if torch.is_tensor(t) else type(t).__name__} of shape {list(getattr(t, 'shape', []))}")
        step = s.inputs.step
        for name, value, wanted in (("level", level, "level"), ("interval", interval, "interval")):
            if step != wanted and value is not None:
                problems.append(f"{name} given, but this network embeds {'no step input' if step == 'none' else 'a ' + step}")
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
                            f"(a shortcut model trained with intrinsic guidance) and None otherwise, got {described(guidance)}")
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
                            f"resolution = latent size x {s.image_downsample}, the VAE's factor), got {described(cond)}")
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
