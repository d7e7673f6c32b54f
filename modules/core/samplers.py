"""Samplers: shortcut, MeanFlow, Euler / Heun flow ODE, DDIM and ancestral DDPM, plus classifier-free guidance.

Samplers call a model *function* ``fn(x, t, level) -> Tensor`` (t [B] float in [0, 1], flow
convention t = 0 noise, t = 1 data; level: [B] long shortcut level, [B] float MeanFlow interval
length, or None) and know nothing about the network; :func:`guided` turns a conditional network
into such a function. Stochastic samplers
draw from one generator per sample (``modules.seeding.noise_generators``), so a sample depends
on its seed only, never on the batch it was generated in. Which step counts a model can be
sampled with is a config rule (``modules.sampling_rules.sampling_problem``), checked before sampling.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from modules.core.objectives import DDPMSchedule, ModelCall

SampleFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
METHODS = ("shortcut", "meanflow", "euler", "heun", "ddim", "ddpm")


def _per_sample_randn(like: torch.Tensor, generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(like)
    rows = [torch.randn(tuple(like.shape[1:]), generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------- guidance

def guided(model: ModelCall, cond: Optional[torch.Tensor], cfg_scale: float, intrinsic: bool = False) -> SampleFn:
    """Classifier-free guidance v_u + w (v_c - v_u) as a sampler function.

    w == 1: conditional forward only; w == 0: unconditional forward only; otherwise one
    doubled-batch forward where both branches see the same x. ``cond`` None: the model is
    unconditional and ``cfg_scale`` is ignored. ``intrinsic``: the model takes w as an input
    (intrinsic guidance), so one conditional forward is given it.
    """
    if cond is None:
        return lambda x, t, level=None: model(x, t, level=level, cond=None, drop=None)
    scale = float(cfg_scale)
    if intrinsic:
        return lambda x, t, level=None: model(x, t, level=level, cond=cond, drop=None,
                                              guidance=torch.full((x.shape[0],), scale, device=x.device))

    def fn(x: torch.Tensor, t: torch.Tensor, level: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = x.shape[0]
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

def _times(x: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


@torch.no_grad()
def sample_shortcut(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler steps that ask the model for its step size: x <- x + (1/steps) fn(x, i/steps, level=log2 steps)."""
    level = torch.full((noise.shape[0],), steps.bit_length() - 1, dtype=torch.long, device=noise.device)
    return sample_euler(lambda x, t, _: fn(x, t, level), noise, steps)


@torch.no_grad()
def sample_meanflow(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """MeanFlow steps on the grid t_i = i/steps: x <- x + (t_(i+1) - t_i) u(x, t_i, h = t_(i+1) - t_i),
    u the average velocity over the step (1 step: one forward from noise to data)."""
    x = noise
    for i in range(steps):
        t, s = i / steps, (i + 1) / steps
        x = x + (s - t) * fn(x, _times(x, t), _times(x, s - t)).to(x.dtype)
    return x


@torch.no_grad()
def sample_euler(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """x <- x + (1/steps) fn(x, i/steps, None), i = 0..steps-1."""
    x = noise
    for i in range(steps):
        x = x + fn(x, _times(x, i / steps), None).to(x.dtype) / steps
    return x


@torch.no_grad()
def sample_heun(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Heun's second-order method (2 evaluations per step, the last one at t = 1)."""
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
    stride = num_timesteps / steps
    return [int(round(num_timesteps - i * stride)) - 1 for i in range(steps)]


@torch.no_grad()
def sample_ddim(fn: SampleFn, noise: torch.Tensor, steps: int, schedule: DDPMSchedule, eta: float = 0.0,
                generators: Optional[Sequence[torch.Generator]] = None) -> torch.Tensor:
    """DDIM for an epsilon model; eta = 1 is the DDPM posterior, eta = 0 deterministic.

    The last step goes to the model's x0 estimate (alpha_cumprod of 'step -1' taken as 1).
    """
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
    """ddim: schedule, eta, generators; ddpm: schedule, generators."""
    if method == "shortcut":
        return sample_shortcut(fn, noise, steps, **kw)
    if method == "meanflow":
        return sample_meanflow(fn, noise, steps, **kw)
    if method == "euler":
        return sample_euler(fn, noise, steps, **kw)
    if method == "heun":
        return sample_heun(fn, noise, steps, **kw)
    if method == "ddim":
        return sample_ddim(fn, noise, steps, **kw)
    if method == "ddpm":
        return sample_ddpm(fn, noise, steps=steps, **kw)
    raise ValueError(f"sampler {method!r} is not one of {', '.join(METHODS)}")
