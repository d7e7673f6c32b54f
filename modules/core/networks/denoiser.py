"""What the stage-2 networks (modules/unet.py, modules/dit.py) share: the call contract and its one
input check, gradient checkpointing, the time sinusoid, the step-size and guidance embeddings,
zero-initialised layers, self- and cross-attention.

Every stage-2 network is called as ``model(x, t, level=None, cond=None, drop=None, guidance=None)``
and returns a prediction shaped like ``x`` (see :class:`Denoiser`), so objectives, samplers, EMAs,
checkpoints and exports never ask which network they hold.
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from modules.core.attention import attention
from modules.config.schema import CondConfig, UNetModelConfig

TIME_SCALE = 1000.0   # t in [0, 1] is embedded as t * 1000: raw [0, 1] would collapse the sinusoid


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


def step_embedding(model_cfg: UNetModelConfig, frequency_channels: int, dim: int) -> Optional[nn.Module]:
    """The second time input: a table of shortcut levels, MeanFlow's interval length embedded like t, or None."""
    if model_cfg.step_input == "interval":
        return ScalarEmbedding(frequency_channels, dim, model_cfg.time_freq_shift)
    return nn.Embedding(model_cfg.num_step_levels, dim) if model_cfg.num_step_levels > 0 else None


def guidance_embedding(model_cfg: UNetModelConfig, frequency_channels: int, dim: int) -> Optional[nn.Module]:
    """iSM's intrinsic guidance: the guidance scale w embedded like t (sinusoid of w * 1000, MLP), or None."""
    return ScalarEmbedding(frequency_channels, dim, model_cfg.time_freq_shift) if model_cfg.guidance_input else None


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
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to context tokens (fused k/v projection)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        head_dim = c // self.heads
        q = self.q(x).view(b, n, self.heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.out(attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Denoiser(nn.Module):
    """Base of the stage-2 networks: ``forward(x, t, level=None, cond=None, drop=None, guidance=None)`` ->
    prediction like ``x``.

    x: latents ``[B, in_channels, h, w]`` (h, w divisible by ``size_factor``); t: ``[B]`` float in [0, 1];
    level: the step input, required iff the network has one: ``[B]`` long step-size level
    (``model.step_input=level`` with ``model.num_step_levels > 0``) or ``[B]`` float interval length
    h in [0, 1] (``model.step_input=interval``); cond: see :class:`modules.conditioning.Conditioner`
    (None = null condition for every sample); drop: ``[B]`` bool, True = use the null condition for
    that sample (classifier-free guidance); guidance: ``[B]`` float guidance scale, required iff
    ``model.guidance_input``. Set ``gradient_checkpointing = True`` to recompute block activations in
    the backward pass. Subclasses set ``time_mlp`` (its first layer's width is the sinusoid's),
    ``level_emb`` and ``guidance_emb`` (:func:`step_embedding`, :func:`guidance_embedding`),
    ``conditioner``, ``size_factor`` and ``size_rule`` (why that factor).
    """

    time_mlp: nn.Sequential
    level_emb: Optional[nn.Module]
    guidance_emb: Optional[nn.Module]
    conditioner: nn.Module
    size_factor: int
    size_rule: str
    time_freq_shift = 0

    def __init__(self, model_cfg: UNetModelConfig, cond_cfg: CondConfig):
        super().__init__()
        self.model_cfg = copy.deepcopy(model_cfg)
        self.cond_cfg = copy.deepcopy(cond_cfg)
        self.gradient_checkpointing = False

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor],
                      cond: Optional[torch.Tensor], drop: Optional[torch.Tensor],
                      guidance: Optional[torch.Tensor]) -> torch.Tensor:
        """The network's one input check (shapes and dtypes only: no device sync), because a wrong
        shape would otherwise fail deep inside torch or, worse, broadcast silently."""
        m, c = self.model_cfg, self.cond_cfg
        factor = self.size_factor
        if x.ndim != 4 or x.shape[1] != m.in_channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"x must be latents [B, {m.in_channels}, h, w] with h and w divisible by {factor} "
                             f"({self.size_rule}), got shape {list(x.shape)}")
        b = x.shape[0]
        problems = []
        if not torch.is_tensor(t) or not t.is_floating_point() or t.shape not in ((), (b,)):
            problems.append(f"t must be a float tensor of shape [{b}] with values in [0, 1], got "
                            f"{t.dtype if torch.is_tensor(t) else type(t).__name__} of shape {list(getattr(t, 'shape', []))}")
        if self.level_emb is None and level is not None:
            problems.append("level given, but this network has no step-size embedding (model.num_step_levels=0)")
        interval = m.step_input == "interval"
        if self.level_emb is not None and (level is None or tuple(level.shape) != (b,) or (
                not level.is_floating_point() if interval else level.dtype not in (torch.int64, torch.int32))):
            kind, what = (("a float", "the interval length (model.step_input=interval)") if interval else
                          ("an integer", f"the step size (model.num_step_levels={m.num_step_levels})"))
            problems.append(f"this network embeds {what}: level must be {kind} tensor of shape [{b}], got "
                            f"{'None' if level is None else f'{level.dtype} of shape {list(level.shape)}'}")
        if (self.guidance_emb is not None) != (guidance is not None) or (
                guidance is not None and (not guidance.is_floating_point() or tuple(guidance.shape) != (b,))):
            problems.append(f"guidance must be a float tensor of shape [{b}] for a network with a guidance input "
                            f"(model.guidance_input={m.guidance_input}) and None otherwise, got "
                            f"{'None' if guidance is None else f'{guidance.dtype} of shape {list(guidance.shape)}'}")
        if c.type == "none" and cond is not None:
            problems.append("this network is unconditional (cond.type=none) but a condition was given")
        if c.type == "class" and cond is not None and (cond.dtype not in (torch.int64, torch.int32)
                                                         or tuple(cond.shape) != (b,)):
            problems.append(f"class condition must be an integer tensor of shape [{b}], "
                            f"got {cond.dtype} of shape {list(cond.shape)}")
        expected_text = (b, c.text_tokens, m.context_dim)
        if c.type == "text" and cond is not None and (not cond.is_floating_point()
                                                        or tuple(cond.shape) != expected_text):
            problems.append(f"text condition must be the text encoder's token embeddings, a float tensor of shape "
                            f"{list(expected_text)} ([B, cond.text_tokens, model.context_dim]), "
                            f"got {cond.dtype} of shape {list(cond.shape)}")
        expected_mask = (b, 1, x.shape[2] * c.image_downsample, x.shape[3] * c.image_downsample)
        if c.type == "mask" and cond is not None and (not cond.is_floating_point()
                                                        or tuple(cond.shape) != expected_mask):
            problems.append(f"mask condition must be a float tensor of shape {list(expected_mask)} (image "
                            f"resolution = latent size x cond.image_downsample={c.image_downsample}), "
                            f"got {cond.dtype} of shape {list(cond.shape)}")
        if drop is not None and (drop.dtype != torch.bool or tuple(drop.shape) != (b,)):
            problems.append(f"drop must be a bool tensor of shape [{b}], got {drop.dtype} of shape {list(drop.shape)}")
        if problems:
            raise ValueError("; ".join(problems))
        return t.expand(b)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """MLP of the ``t * 1000`` sinusoid."""
        first = self.time_mlp[0]
        sinusoid = timestep_embedding(t, first.in_features, freq_shift=self.time_freq_shift)
        return self.time_mlp(sinusoid.to(first.weight.dtype))

    def _conditioned(self, x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor],
                     cond: Optional[torch.Tensor], drop: Optional[torch.Tensor], guidance: Optional[torch.Tensor]):
        """The checked inputs as the network body takes them: ``(x, emb, context)``, with ``emb`` the
        SiLU of time + step-size + guidance + condition embeddings, ``x`` with the mask channels
        concatenated and ``context`` the cross-attention tokens (or None)."""
        t = self._check_inputs(x, t, level, cond, drop, guidance)
        emb = self.time_embedding(t)
        if self.level_emb is not None:
            emb = emb + self.level_emb(level)
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
