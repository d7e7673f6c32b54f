"""Flow matching (rectified flow): x_t = (1 - t) x0 + t x1, regress the velocity x1 - x0.

Sampled with Euler or Heun steps over the flow's ODE, any number of steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.core.objectives.base import (Draws, Logs, ModelCall, Objective, condition_dropout, draw_device,
                                          mse_per_sample, noise_for, per_row, rand)
from modules.core.samplers import sample_ode
from modules.core.settings import one_of, setting


@dataclass
class FlowConfig:
    time_sampling: str = setting("uniform", one_of("uniform", "logit_normal"))


class Flow(Objective):
    name = "flow"
    Config = FlowConfig
    samplers = ("euler", "heun")

    def sample_t(self, n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        if self.cfg.time_sampling == "logit_normal":
            # SD3's logit-normal(0, 1): more weight on the middle of the path.
            z = torch.randn(n, generator=generator, device=draw_device(generator, device)).to(device)
            return torch.sigmoid(z)
        return rand(n, generator, device)

    def loss(self, net: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        generator = draws.generator
        noise = noise_for(x1, draws)
        t = self.sample_t(x1.shape[0], generator, x1.device)
        drop = condition_dropout(x1.shape[0], cond, self.cond_drop, generator, x1.device)
        tb = per_row(t, x1)
        x_t = (1 - tb) * noise + tb * x1
        pred = net(x_t, t, cond=cond, drop=drop)
        loss = mse_per_sample(pred, x1 - noise).mean()
        return loss, {"loss_flow": loss.detach()}

    @staticmethod
    def sample(cfg, sampler: str, fn: ModelCall, noise: torch.Tensor, steps: int,
               generators: Optional[Sequence[torch.Generator]] = None, eta: float = 0.0) -> torch.Tensor:
        return sample_ode(sampler, fn, noise, steps)
