"""DDPM (epsilon prediction) on Stable Diffusion's scaled-linear schedule, sampled with DDIM or ancestral DDPM.

The network sees t = timestep / num_timesteps. DDIM uses "trailing" spacing (Lin et al. 2023), so
one step starts from the noisiest level; its last step goes to the model's x0 estimate.
Stochastic steps draw from one generator per sample, so a sample depends on its seed only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.core.objectives.base import (Draws, Logs, ModelCall, Objective, condition_dropout, mse_per_sample,
                                          noise_for, per_row, randint)
from modules.core.samplers import SampleFn, times
from modules.core.settings import at_most, fail, fraction, positive, setting


@dataclass
class DDPMConfig:
    num_timesteps: int = setting(1000, positive, at_most(100_000))
    beta_start: float = setting(0.00085, fraction(low_open=True, high_open=True))
    beta_end: float = setting(0.012, fraction(low_open=True, high_open=True))

    def check(self, prefix: str) -> None:
        if self.beta_start > self.beta_end:
            raise fail(f"{prefix}beta_start", f"{self.beta_start} is above {prefix}beta_end={self.beta_end}")


class DDPMSchedule:
    """Stable Diffusion's scaled-linear schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2."""

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        self.num_timesteps = num_timesteps
        # float64 so products over 1000 steps stay exact to float32 precision.
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    @classmethod
    def from_config(cls, cfg: DDPMConfig) -> "DDPMSchedule":
        return cls(cfg.num_timesteps, cfg.beta_start, cfg.beta_end)

    def add_noise(self, x: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_t) x + sqrt(1 - abar_t) noise for integer timesteps [B]."""
        abar = self.alphas_cumprod.to(x.device)[timesteps]
        return per_row(abar.sqrt(), x) * x + per_row((1 - abar).sqrt(), x) * noise


class DDPM(Objective):
    """Epsilon prediction; the network sees t = timestep / num_timesteps."""
    name = "ddpm"
    Config = DDPMConfig
    samplers = ("ddim", "ddpm")

    def __init__(self, cfg: DDPMConfig, cond_drop: float = 0.0, teacher=None):
        super().__init__(cfg, cond_drop, teacher)
        self.schedule = DDPMSchedule.from_config(cfg)

    def loss(self, net: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        generator = draws.generator
        noise = noise_for(x1, draws)
        timesteps = randint(self.schedule.num_timesteps, x1.shape[0], generator, x1.device)
        drop = condition_dropout(x1.shape[0], cond, self.cond_drop, generator, x1.device)
        x_t = self.schedule.add_noise(x1, noise, timesteps)
        pred = net(x_t, timesteps.float() / self.schedule.num_timesteps, cond=cond, drop=drop)
        loss = mse_per_sample(pred, noise).mean()
        return loss, {"loss_ddpm": loss.detach()}

    @staticmethod
    def eval_steps(cfg: DDPMConfig) -> tuple[int, ...]:
        finest = min(cfg.num_timesteps, 250)
        return tuple(sorted({1, min(4, finest), finest}))

    @staticmethod
    def steps_problem(cfg: DDPMConfig, sampler: str, steps: int) -> Optional[str]:
        if steps > cfg.num_timesteps:
            return f"{steps} steps: must be <= the schedule's {cfg.num_timesteps} timesteps (ddpm.num_timesteps)"
        return None

    @staticmethod
    def sample(cfg: DDPMConfig, sampler: str, fn: ModelCall, noise: torch.Tensor, steps: int,
               generators: Optional[Sequence[torch.Generator]] = None, eta: float = 0.0) -> torch.Tensor:
        """``ddim`` with ``eta``, or ``ddpm``: DDIM with eta 1, the DDPM posterior."""
        eta = {"ddim": eta, "ddpm": 1.0}[sampler]
        return sample_ddim(fn, noise, steps, DDPMSchedule.from_config(cfg), eta, generators)


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """'Trailing' spacing (Lin et al. 2023): starts at T - 1, so 1 step starts from the noisiest level."""
    stride = num_timesteps / steps
    return [int(round(num_timesteps - i * stride)) - 1 for i in range(steps)]


def per_sample_randn(like: torch.Tensor, generators: Optional[Sequence[torch.Generator]]) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(like)
    rows = [torch.randn(tuple(like.shape[1:]), generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device=like.device, dtype=like.dtype)


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
        eps = fn(x, times(x, t / schedule.num_timesteps)).to(x.dtype)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * per_sample_randn(x, generators)
    return x
