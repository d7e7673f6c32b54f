"""Samplers: shortcut, Euler / Heun flow ODE, DDIM and ancestral DDPM, plus CFG and seeded noise.

Samplers call a model *function* ``fn(x, t, level) -> Tensor`` (t [B] float in [0, 1], flow
convention t = 0 noise, t = 1 data; level [B] long or None) and know nothing about the
network; :func:`guided` turns a conditional network into such a function. Noise is drawn
per sample from its own generator, so a sample depends on its seed only, never on the batch
it was generated in.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from modules.objectives import DDPMSchedule, ModelCall

SampleFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
METHODS = ("shortcut", "euler", "heun", "ddim", "ddpm")

# Per-sample stochastic-sampler streams are seeded apart from the initial-noise stream.
_STREAM_OFFSET = 0x9E3779B97F4A7C15


# ----------------------------------------------------------------------------- noise

def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(seeds), *shape] standard normal; row i drawn on CPU from Generator(seeds[i])."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    if not rows:
        raise ValueError("initial_noise: no seeds given")
    return torch.stack(rows).to(device=device, dtype=dtype)


def noise_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample for stochastic samplers, independent of initial_noise's."""
    return [torch.Generator().manual_seed((int(s) + _STREAM_OFFSET) % 2 ** 64) for s in seeds]


def _per_sample_randn(like: torch.Tensor, generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(like)
    if len(generators) != like.shape[0]:
        raise ValueError(f"sampler: {len(generators)} generators for a batch of {like.shape[0]}")
    rows = [torch.randn(tuple(like.shape[1:]), generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------- guidance

def guided(model: ModelCall, cond: Optional[torch.Tensor], cfg_scale: float) -> SampleFn:
    """Classifier-free guidance v_u + w (v_c - v_u) as a sampler function.

    w == 1: conditional forward only; w == 0: unconditional forward only; otherwise one
    doubled-batch forward where both branches see the same x. ``cond`` None: the model is
    unconditional and ``cfg_scale`` is ignored.
    """
    if cond is None:
        return lambda x, t, level=None: model(x, t, level=level, cond=None, drop=None)
    scale = float(cfg_scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"guided: cfg_scale must be finite, got {cfg_scale}")

    def fn(x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = x.shape[0]
        if cond.shape[0] != b:
            raise ValueError(f"guided: the condition has {cond.shape[0]} rows but the batch has {b}")
        if scale == 1.0:
            return model(x, t, level=level, cond=cond, drop=None)
        if scale == 0.0:
            return model(x, t, level=level, cond=cond, drop=torch.ones(b, dtype=torch.bool, device=x.device))
        rows = torch.arange(b, device=cond.device).repeat(2)
        drop = torch.arange(2 * b, device=x.device) >= b
        out = model(x.repeat(2, *([1] * (x.dim() - 1))), t.repeat(2),
                    level=None if level is None else level.repeat(2), cond=cond[rows], drop=drop)
        v_cond, v_uncond = out[:b], out[b:]
        return v_uncond + scale * (v_cond - v_uncond)

    return fn


# ----------------------------------------------------------------------------- flow samplers

def _check_steps(steps: int, method: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{method} sampler: steps must be an integer >= 1, got {steps!r}")


def _times(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


@torch.no_grad()
def sample_shortcut(fn: SampleFn, noise: torch.Tensor, steps: int, max_steps: int) -> torch.Tensor:
    """x <- x + (1/steps) fn(x, i/steps, level=log2 steps), i = 0..steps-1."""
    _check_steps(steps, "shortcut")
    if steps & (steps - 1) or steps > max_steps:
        raise ValueError(f"shortcut sampler: steps must be a power of two between 1 and the model's "
                         f"denoise_timesteps={max_steps} (1, 2, 4, ..., {max_steps}), got {steps}")
    level = torch.full((noise.shape[0],), steps.bit_length() - 1, dtype=torch.long, device=noise.device)
    x = noise
    for i in range(steps):
        x = x + fn(x, _times(x, i / steps), level).to(x.dtype) / steps
    return x


@torch.no_grad()
def sample_euler(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    _check_steps(steps, "euler")
    x = noise
    for i in range(steps):
        x = x + fn(x, _times(x, i / steps), None).to(x.dtype) / steps
    return x


@torch.no_grad()
def sample_heun(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Heun's second-order method (2 evaluations per step, the last one at t = 1)."""
    _check_steps(steps, "heun")
    x = noise
    h = 1.0 / steps
    for i in range(steps):
        v1 = fn(x, _times(x, i * h), None).to(x.dtype)
        v2 = fn(x + h * v1, _times(x, (i + 1) * h), None).to(x.dtype)
        x = x + h * (v1 + v2) / 2
    return x


# ----------------------------------------------------------------------------- epsilon samplers

def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """'Trailing' spacing (Lin et al. 2023): starts at T - 1, so 1 step starts from the noisiest level."""
    _check_steps(steps, "ddim")
    if steps > num_timesteps:
        raise ValueError(f"ddim sampler: steps must be <= the schedule's {num_timesteps} timesteps, got {steps}")
    stride = num_timesteps / steps
    return [int(round(num_timesteps - i * stride)) - 1 for i in range(steps)]


@torch.no_grad()
def sample_ddim(fn: SampleFn, noise: torch.Tensor, steps: int, schedule: DDPMSchedule, eta: float = 0.0,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """DDIM for an epsilon model; eta = 1 is the DDPM posterior, eta = 0 deterministic.

    The last step goes to the model's x0 estimate (alpha_cumprod of 'step -1' taken as 1).
    """
    if eta < 0:
        raise ValueError(f"ddim sampler: eta must be >= 0, got {eta}")
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    abar = schedule.alphas_cumprod.tolist()
    x = noise
    for i, t in enumerate(timesteps):
        a = abar[t]
        a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        eps = fn(x, _times(x, t / schedule.num_timesteps), None).to(x.dtype)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * _per_sample_randn(x, generators)
    return x


def sample_ddpm(fn: SampleFn, noise: torch.Tensor, schedule: DDPMSchedule, steps: Optional[int] = None,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """Ancestral DDPM (posterior variance beta~); steps None = all of the schedule's timesteps."""
    return sample_ddim(fn, noise, steps or schedule.num_timesteps, schedule, eta=1.0, generators=generators)


# ----------------------------------------------------------------------------- dispatch

def sample(method: str, fn: SampleFn, noise: torch.Tensor, steps: Optional[int], **kw) -> torch.Tensor:
    """shortcut: max_steps=M; ddim: schedule, eta, generators; ddpm: schedule, generators."""
    if method == "shortcut":
        return sample_shortcut(fn, noise, steps, **kw)
    if method == "euler":
        return sample_euler(fn, noise, steps, **kw)
    if method == "heun":
        return sample_heun(fn, noise, steps, **kw)
    if method == "ddim":
        return sample_ddim(fn, noise, steps, **kw)
    if method == "ddpm":
        return sample_ddpm(fn, noise, steps=steps, **kw)
    raise ValueError(f"sampler {method!r} is not one of {', '.join(METHODS)}")
