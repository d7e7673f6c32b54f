"""Samplers over a model *function*, and classifier-free guidance that makes one from a network.

A sampler integrates ``fn(x, t) -> velocity`` (t [B] float in [0, 1], flow convention t = 0 noise,
t = 1 data) and knows nothing about the network; each objective (modules/core/objectives/) binds
the network's other inputs (a shortcut level, a MeanFlow interval) and picks the sampler, and
DDPM's epsilon samplers live with its schedule. :func:`guided` turns a conditional network into
a function ``fn(x, t, **inputs)``. Which step counts a model can be sampled with is its
objective's rule (``Objective.sampling_problem``), checked before sampling.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

SampleFn = Callable[..., torch.Tensor]


def guided(net: SampleFn, cond: Optional[torch.Tensor], cfg_scale: float, intrinsic: bool = False) -> SampleFn:
    """Classifier-free guidance v_u + w (v_c - v_u) as a function ``fn(x, t, **inputs)``.

    w == 1: conditional forward only; w == 0: unconditional forward only; otherwise one
    doubled-batch forward where both branches see the same x. ``cond`` None: the network is
    unconditional and ``cfg_scale`` is ignored. ``intrinsic``: the network takes w as an input
    (intrinsic guidance), so one conditional forward is given it.
    """
    if cond is None:
        return lambda x, t, **inputs: net(x, t, cond=None, drop=None, **inputs)
    scale = float(cfg_scale)
    if intrinsic:
        return lambda x, t, **inputs: net(x, t, cond=cond, drop=None, **inputs,
                                          guidance=torch.full((x.shape[0],), scale, device=x.device))

    def fn(x: torch.Tensor, t: torch.Tensor, **inputs) -> torch.Tensor:
        b = x.shape[0]
        if scale == 1.0:
            return net(x, t, cond=cond, drop=None, **inputs)
        if scale == 0.0:
            return net(x, t, cond=cond, drop=torch.ones(b, dtype=torch.bool, device=x.device), **inputs)
        rows = torch.arange(b, device=cond.device).repeat(2)
        drop = torch.arange(2 * b, device=x.device) >= b
        doubled = {name: value.repeat(2) for name, value in inputs.items()}
        out = net(x.repeat(2, *([1] * (x.dim() - 1))), t.repeat(2), cond=cond[rows], drop=drop, **doubled)
        v_cond, v_uncond = out[:b], out[b:]
        return v_uncond + scale * (v_cond - v_uncond)

    return fn


def times(x: torch.Tensor, value: float) -> torch.Tensor:
    """``value`` for every row of ``x``: a [B] float32 time (or interval) on its device."""
    return torch.full((x.shape[0],), value, dtype=torch.float32, device=x.device)


@torch.no_grad()
def sample_euler(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """x <- x + (1/steps) fn(x, i/steps), i = 0..steps-1."""
    x = noise
    for i in range(steps):
        x = x + fn(x, times(x, i / steps)).to(x.dtype) / steps
    return x


@torch.no_grad()
def sample_heun(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Heun's second-order method (2 evaluations per step, the last one at t = 1)."""
    x = noise
    h = 1.0 / steps
    for i in range(steps):
        v1 = fn(x, times(x, i * h)).to(x.dtype)
        v2 = fn(x + h * v1, times(x, (i + 1) * h)).to(x.dtype)
        x = x + h * (v1 + v2) / 2
    return x


ODE_SAMPLERS = {"euler": sample_euler, "heun": sample_heun}


def sample_ode(method: str, fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """The flow ODE integrated by ``method`` (euler or heun) in ``steps`` steps."""
    return ODE_SAMPLERS[method](fn, noise, steps)


@torch.no_grad()
def sample_meanflow(fn: SampleFn, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """MeanFlow steps on the grid t_i = i/steps: x <- x + (t_(i+1) - t_i) u(x, t_i, h = t_(i+1) - t_i),
    u the average velocity over the step (1 step: one forward from noise to data)."""
    x = noise
    for i in range(steps):
        t, s = i / steps, (i + 1) / steps
        x = x + (s - t) * fn(x, times(x, t), interval=times(x, s - t)).to(x.dtype)
    return x
