"""The randomness of one training micro-batch: :class:`Draws`, and the draws objectives make from it.

Every random choice of an objective (noise, times, dropout, levels, guidance scales) comes from
``Draws.generator``, so a micro-batch's training is a pure function of its seed and place in the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Draws:
    """The randomness of one micro-batch.

    ``generator`` makes every random draw (noise, times, dropout, levels); ``index`` is the
    micro-batch's place in the run (over steps, micro-steps and processes), for choices that
    rotate deterministically rather than being drawn. ``index`` None draws them too. ``noise``,
    when given, is the x0 of every row, paired with the data before the objective sees it.
    """
    generator: Optional[torch.Generator] = None
    index: Optional[int] = None
    noise: Optional[torch.Tensor] = None   # x0 paired with the data beforehand (train.ot_pairing); None: drawn


def noise_for(x1: torch.Tensor, draws: Draws) -> torch.Tensor:
    """The micro-batch's noise x0: the paired noise when given, else drawn like ``x1``."""
    return draws.noise if draws.noise is not None else randn_like(x1, draws.generator)


def draw_device(generator: Optional[torch.Generator], device: torch.device) -> torch.device:
    # A generator only draws on its own device; results are moved to the data's device.
    return generator.device if generator is not None else device


def rand(n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=draw_device(generator, device)).to(device)


def randint(high: int, n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=draw_device(generator, device)).to(device)


def randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    noise = torch.randn(x.shape, generator=generator, device=draw_device(generator, x.device))
    return noise.to(device=x.device, dtype=x.dtype)


def per_row(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` ([B], one value per row of ``x``) shaped to multiply ``x``: [B, 1, ..., 1] in ``x``'s dtype."""
    return t.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def condition_dropout(n: int, cond: Optional[torch.Tensor], cond_drop: float,
                      generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Tensor]:
    """Whole-sample dropout mask (True = null condition); None for unconditional models."""
    if cond is None:
        return None
    return rand(n, generator, device) < cond_drop
