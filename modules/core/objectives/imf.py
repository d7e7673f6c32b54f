"""The improved MeanFlow objective (iMF; Geng, Lu, Wu, Shechtman, Kolter, He, "Improved Mean Flows: On the
Challenges of Fastforward Generative Models", arXiv 2512.02012), as the official JAX code trains it
(github.com/Lyy-iiis/imeanflow at bf60cd7, imf.py; cited as imf.py:LINE).

In this project's time (t = 0 noise x0, t = 1 data x1, x_t = (1 - t) x0 + t x1, v = x1 - x0) the
network u(z, h | w, [low, high], c) predicts the average velocity over [t, s], h = s - t >= 0, as
MeanFlow's (modules/core/objectives/meanflow.py); it is not told t, only h (imfDiT.py:342-344), the
guidance scale w, the guidance interval and the condition, and an auxiliary head gives v, the
instantaneous velocity. The paper runs time the other way (t = 1 noise, r <= t); its (t, r) are
(1 - s, 1 - t) here, h is the same number, every velocity flips sign, du/dt keeps its sign, its
logit-normal(-0.4, 1) is logit-normal(+0.4, 1) here, and its guidance interval [t_min, t_max] is
[low, high] = [1 - t_max, 1 - t_min] here (the network embeds it as the paper's values,
modules/core/networks/icdit.py).

One micro-batch of B rows (B is the official per-device batch):

- Draws (imf.py:120-179, 263-293): t, s the lower and higher of two logit-normal draws, the first
  floor(B * equal_fraction) rows s = t; w from p(w) ~ w^-beta on ``guidance_range`` (beta = 1:
  log w uniform); low ~ U[0, c], high ~ U[c, 1] (c = ``interval_split``), [0, 1] on the s = t rows;
  condition dropout (``cond.drop``) on the *first* round-count rows: num_drop = #(U < p), rows
  0 .. num_drop - 1, so dropped rows are s = t rows unless num_drop > B / 2.
- Target (imf.py:295-325), without gradient: one doubled forward of the v-head at h = 0, interval
  [0, 1], gives v_c (the row's condition, w' = w for t in [low, high] (inclusive) and 1 outside)
  and v_u (the null condition, w = 1); v_g = (x1 - x0) + (1 - 1/w') (v_c - v_u), and x1 - x0 on
  dropped rows. (The official code asks v_c at the raw w as well, for the s = t rows, where w' = w
  because their interval is [0, 1]: the same value, so one query serves.)
- JVP (imf.py:366-373): u, du/dt = one JVP of (z, t, s) -> u(z, h = s - t | w (raw), [low, high],
  c (dropped)) along (v_c, 1, 0): the tangent is the network's own conditional velocity, not
  x1 - x0. The v-head's output v comes out of the same forward (``head="uv"``).
- Loss (imf.py:376-393): V = u - h sg(du/dt) (the paper's u + (t - r) du/dt, mirrored), and
  mean over rows of  l_u / sg(l_u + eps)^p + l_v / sg(l_v + eps)^p,  l_u = sum |V - sg v_g|^2,
  l_v = sum |v - sg v_g|^2 (sums over the latent's elements), eps = 0.01, p = 1.

Without a velocity head (``imf.velocity_head=false``; the paper's v = u(z, t, t), the boundary
condition) the target's queries and the tangent take u at h = 0, and the loss is its first term
only: on the s = t rows V = u(z, t, t) is the v that the second term would train.

The JVP runs through :func:`modules.core.objectives.base.average_velocity_jvp` (torch.func.jvp, or
forward_ad under DDP and FSDP1; attention on SDPA's math backend), in the run's precision: the official
code runs everything in float32, ``train.mixed_precision=no`` (the imf presets) does that here.
Gradient checkpointing is refused as for MeanFlow (torch does not recompute tangents).

Sampled as the official code does (imf.py:8-50, 90-114), MeanFlow steps on the grid t_i = i / k with
w and the interval as inputs and no unconditional pass (the ``meanflow`` sampler: 1 step is one
forward), or as a flow at h = 0 (Euler, Heun). The guidance scale comes from the caller
(``guided(..., intrinsic=True)`` gives it to the network), and so does the interval; a caller that names
none gets ``imf.sample_scale`` and ``imf.sample_interval`` (the official B/2 setting w = 8, [0.40, 0.65]
in the paper's time, which is [0.35, 0.60] here; configs/eval_config.yml:10-21).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.core.networks.denoiser import NetworkInputs
from modules.core.objectives.base import (Draws, Logs, ModelCall, Objective, average_velocity_jvp,
                                         first_rows_dropout, noise_for, num_equal, paired_times, per_row, rand,
                                         unit_intervals)
from modules.core.samplers import sample_meanflow, sample_ode
from modules.core.settings import (at_least, at_most, fail, fraction, non_negative, positive, scale_range, setting,
                                   time_interval)


@dataclass
class ImfConfig:
    """Improved MeanFlow in this project's time (t = 0 noise); the defaults are the official B/2 run's."""
    # t and s: the lower and higher of two logit-normal draws (the paper's logit-normal(-0.4, 1) over its
    # reversed time, imf.py:62-63, 120-124).
    time_mean: float = setting(0.4, at_least(-10), at_most(10))
    time_std: float = setting(1.0, positive, at_most(10))
    equal_fraction: float = setting(0.5, fraction())     # the first floor(B * f) rows get s = t (imf.py:134)
    # The guidance scale w of each row: p(w) ~ w^-beta on the range (imf.py:141-161: [1, 1 + 7], beta 1).
    guidance_range: tuple[float, float] = setting((1.0, 8.0), scale_range)
    guidance_beta: float = setting(1.0, non_negative, at_most(10))
    # Guidance interval of each row: low ~ U[0, c], high ~ U[c, 1] (imf.py:163-179); s = t rows [0, 1].
    interval_split: float = setting(0.5, fraction(low_open=True, high_open=True))
    # Adaptive weight l / sg(l + eps)^p of each row's summed squared error (imf.py:71-72, 380-382).
    loss_eps: float = setting(0.01, positive)
    loss_power: float = setting(1.0, non_negative, at_most(4))
    # v from an auxiliary head sharing all but model.aux_head_depth blocks (the official model); false:
    # v = u(z, t, t), no head (the paper's alternative).
    velocity_head: bool = True
    # Sampling: the scale callers use when not told one, and the interval (imf.py's B/2 setting w = 8,
    # [0.40, 0.65] in the paper's time; configs/eval_config.yml:10-21).
    sample_scale: float = setting(8.0, at_least(1), at_most(100))
    sample_interval: tuple[float, float] = setting((0.35, 0.60), time_interval)

    def check(self, prefix: str) -> None:
        if self.guidance_range[0] < 1:
            raise fail(f"{prefix}guidance_range", f"must start at 1 or above (the network reads 1 - 1/w), got "
                       f"{self.guidance_range}")
        if self.sample_scale < self.guidance_range[0]:
            raise fail(f"{prefix}sample_scale", f"{self.sample_scale} is below the trained guidance_range "
                       f"{self.guidance_range}")


@dataclass
class ImfDraws:
    """The random choices of one micro-batch (:meth:`Imf.draw`)."""
    t: torch.Tensor                       # [B] the lower time
    s: torch.Tensor                       # [B] the higher time (s = t on the first `equal` rows)
    guidance: torch.Tensor                # [B] w
    interval: torch.Tensor                # [B, 2] the guidance interval (low, high) in this project's time
    drop: Optional[torch.Tensor]          # [B] bool, the null condition; None for an unconditional model
    equal: int                            # rows 0 .. equal - 1 have s = t


def guidance_scales(u: torch.Tensor, low: float, high: float, beta: float) -> torch.Tensor:
    """The inverse CDF of p(w) ~ w^-beta on [low, high] at ``u`` in [0, 1): beta = 1, w = low (high/low)^u;
    else w = (low^a + u (high^a - low^a))^(1/a), a = 1 - beta (imf.py:150-159 with low = 1)."""
    u = u.double()
    if beta == 1.0:
        return low * (high / low) ** u
    a = 1.0 - beta
    return (low ** a + u * (high ** a - low ** a)) ** (1.0 / a)


class Imf(Objective):
    """Improved MeanFlow: u from ``interval = h``, w and the guidance interval as inputs; the v-loss."""
    name = "imf"
    Config = ImfConfig
    samplers = ("meanflow", "euler", "heun")

    def draw(self, n: int, conditional: bool, generator: Optional[torch.Generator],
             device: torch.device) -> ImfDraws:
        """The micro-batch's choices (module docstring), all from ``generator``; no read from the device.
        Without a condition (a direct call: run configs refuse it) there is no guidance: w = 1 and the
        interval [0, 1] on every row, and the target is x1 - x0."""
        cfg = self.cfg
        t, s = paired_times(n, cfg.time_mean, cfg.time_std, cfg.equal_fraction, generator, device)
        equal = num_equal(n, cfg.equal_fraction)
        first = torch.arange(n, device=device) < equal
        c = cfg.interval_split
        low, high = c * rand(n, generator, device), c + (1 - c) * rand(n, generator, device)
        interval = torch.where(first[:, None], unit_intervals(n, device), torch.stack([low, high], 1))
        guidance = guidance_scales(rand(n, generator, device), *cfg.guidance_range, cfg.guidance_beta).float()
        drop = None
        if conditional:
            drop = first_rows_dropout(n, self.cond_drop, generator, device)      # imf.py:279-284
        else:
            guidance, interval = torch.ones_like(guidance), unit_intervals(n, device)
        return ImfDraws(t, s, guidance, interval, drop, equal)

    @torch.no_grad()
    def guided_target(self, model: ModelCall, x_t: torch.Tensor, v: torch.Tensor, cond: Optional[torch.Tensor],
                      d: ImfDraws) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v_g, v_c)``: the regression target and the JVP's tangent, from the velocity head (u at h = 0
        without one) at h = 0 and the interval [0, 1]: v_c at the row's condition and w' (w inside the row's
        interval, 1 outside), v_u at the null condition and w = 1; v_g = v + (1 - 1/w') (v_c - v_u), v on
        dropped rows (imf.py:295-325, 286-291)."""
        b, head = x_t.shape[0], "v" if self.cfg.velocity_head else "u"
        low, high = d.interval[:, 0], d.interval[:, 1]
        w = torch.where((d.t >= low) & (d.t <= high), d.guidance, torch.ones_like(d.guidance))
        if cond is None:
            v_c = model(x_t, d.t, interval=torch.zeros_like(d.t), cond=None, drop=None, guidance=w,
                        guidance_interval=unit_intervals(b, x_t.device), head=head)
            return v, v_c.to(v.dtype)
        null = torch.arange(2 * b, device=x_t.device) >= b          # one doubled forward: conditional, then null
        out = model(torch.cat([x_t, x_t]), torch.cat([d.t, d.t]), interval=torch.zeros(2 * b, device=x_t.device),
                    cond=torch.cat([cond, cond]), drop=null, guidance=torch.cat([w, torch.ones_like(w)]),
                    guidance_interval=unit_intervals(2 * b, x_t.device), head=head)
        v_c, v_u = out[:b].to(v.dtype), out[b:].to(v.dtype)
        v_g = v + per_row(1 - 1 / w, v) * (v_c - v_u)
        return torch.where(d.drop.view(-1, *([1] * (v.dim() - 1))), v, v_g), v_c

    def loss(self, model: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        noise = noise_for(x1, draws)
        return self.loss_of(model, x1, noise, cond, self.draw(x1.shape[0], cond is not None, draws.generator,
                                                                x1.device))

    def loss_of(self, model: ModelCall, x1: torch.Tensor, x0: torch.Tensor, cond: Optional[torch.Tensor],
                d: ImfDraws) -> tuple[torch.Tensor, Logs]:
        """The v-loss of data ``x1`` and noise ``x0`` under the choices ``d``; ``logs``: "loss_u" and "loss_v",
        the unweighted mean squared errors of V and of v against the target (imf.py:395-399)."""
        cfg = self.cfg
        tb = per_row(d.t, x1)
        x_t = (1 - tb) * x0 + tb * x1
        v_g, v_c = self.guided_target(model, x_t, x1 - x0, cond, d)
        inputs = dict(guidance=d.guidance, guidance_interval=d.interval)
        if cfg.velocity_head:
            u, du_dt, v = average_velocity_jvp(model, x_t, d.t, d.s, v_c, cond, d.drop, has_aux=True, head="uv",
                                               **inputs)
        else:
            u, du_dt = average_velocity_jvp(model, x_t, d.t, d.s, v_c, cond, d.drop, **inputs)
            v = None
        big_v = u - per_row(d.s - d.t, u) * du_dt.detach()          # V: the network's instantaneous velocity
        wide = torch.promote_types(x1.dtype, torch.float32)           # at least float32 (float64 stays)
        target = v_g.detach().to(wide)

        def weighted(pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            squared = (pred.to(wide) - target).pow(2).flatten(1).sum(1)
            return squared / (squared.detach() + cfg.loss_eps) ** cfg.loss_power, squared.detach()

        loss, sq_u = weighted(big_v)
        per_element = x1[0].numel()
        logs = {"loss_u": sq_u.mean() / per_element}
        if v is not None:
            loss_v, sq_v = weighted(v)
            loss = loss + loss_v
            logs["loss_v"] = sq_v.mean() / per_element
        return loss.mean(), logs

    # ---- what the network and the run need

    @staticmethod
    def network_inputs(cfg: ImfConfig) -> NetworkInputs:
        return NetworkInputs(step="interval", interval_only=True, guidance=True, guidance_interval=True,
                             velocity_head=cfg.velocity_head)

    @staticmethod
    def trains_guidance(cfg: ImfConfig) -> bool:
        return True

    @staticmethod
    def check(cfg: ImfConfig, run, prefix: str) -> None:
        if run.cond.type == "none":
            raise fail(f"{prefix}cond.type", "objective=imf trains guidance as an input and needs a condition "
                       "(class, mask or text); an unconditional one-step model is objective=meanflow")
        if run.train.gradient_checkpointing:
            raise fail(f"{prefix}train.gradient_checkpointing", "cannot be used with objective=imf: torch's "
                       "checkpointing does not recompute the forward-mode (JVP) tangents")

    # ---- sampling and evaluation

    @staticmethod
    def eval_steps(cfg: ImfConfig) -> tuple[int, ...]:
        return (1, 2)

    @staticmethod
    def default_guidance(cfg: ImfConfig) -> float:
        """The guidance scale to sample at when the caller names none (``imf.sample_scale``)."""
        return cfg.sample_scale

    @staticmethod
    def default_guidance_interval(cfg: ImfConfig) -> tuple[float, float]:
        """The guidance interval to sample with when the caller names none (``imf.sample_interval``)."""
        return tuple(cfg.sample_interval)

    @staticmethod
    def guidance_problem(cfg: ImfConfig, scale: float) -> Optional[str]:
        """The scale is a network input: below the trained range 1 - 1/w was never seen; above it the
        network extrapolates (the official M/2 and L/2 settings use 10.5 on a model trained on [1, 8])."""
        low = cfg.guidance_range[0]
        if scale < low:
            return (f"guidance scale {scale}: this model takes the scale as an input and was trained from {low} "
                    f"to {cfg.guidance_range[1]} (imf.guidance_range)")
        return None

    @staticmethod
    def sample(cfg: ImfConfig, sampler: str, fn: ModelCall, noise: torch.Tensor, steps: int,
               generators: Optional[Sequence[torch.Generator]] = None, eta: float = 0.0,
               guidance_interval: Optional[tuple[float, float]] = None) -> torch.Tensor:
        """``meanflow``: x <- x + (t_(i+1) - t_i) u(x, h = t_(i+1) - t_i) on t_i = i / steps (one forward
        per step; imf.py:42-48, 112-114); ``euler``/``heun``: the flow ODE of u at h = 0. The guidance
        interval is ``guidance_interval`` (this project's time; None: ``cfg.sample_interval``), the same at
        every step as the official sampler's; ``fn`` gives the scale (``guided(..., intrinsic=True)``)."""
        chosen = cfg.sample_interval if guidance_interval is None else guidance_interval
        interval = torch.tensor(tuple(chosen), dtype=noise.dtype, device=noise.device).expand(noise.shape[0], 2)

        def with_interval(x: torch.Tensor, t: torch.Tensor, **inputs) -> torch.Tensor:
            return fn(x, t, guidance_interval=interval, **inputs)

        if sampler == "meanflow":
            return sample_meanflow(with_interval, noise, steps)
        return sample_ode(sampler, lambda x, t: with_interval(x, t, interval=torch.zeros_like(t)), noise, steps)
