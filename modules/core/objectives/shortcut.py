"""Shortcut models (Frans et al., "One Step Diffusion via Shortcut Models", ICLR 2025): flow
matching plus self-consistency across step sizes, so one network samples in 1 to M steps.

Per batch of B latents x1 with noise x0 (the specification's algorithm):

- ``B_b = round(B * bootstrap_fraction)`` rows get self-consistency targets, the rest flow targets.
- Flow rows: level log2 M (step d = 1/M), t on the grid i/M, target x1 - x0, condition dropout
  applied here only.
- Bootstrap rows: levels k in 0 .. log2 M - 1 spread evenly (every level in every batch), d = 2^-k,
  t = j d, target from two half steps of a teacher (an EMA of the weights with its own fast decay,
  the "twin EMA" of iSM), no gradient: v1 = f(x_t, t, d/2); x' = clip(x_t + d/2 v1, -4, 4);
  v2 = f(x', t + d/2, d/2); target = clip((v1 + v2) / 2, -4, 4).
- One forward with gradient on the whole batch; MSE (or iSM's wavelet loss) over all rows.

iSM's switches (arXiv 2510.21250): intrinsic guidance (the guidance scale is a network input,
flow targets are guided), the wavelet loss. Sampled by the shortcut sampler (M steps asking for
step 1/M), or Euler/Heun at the finest level.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.core.networks.denoiser import NetworkInputs, Sizes
from modules.core.objectives.base import (Draws, Logs, ModelCall, Objective, guidance_kw, mse_per_sample, noise_for,
                                          per_row, rand, randint)
from modules.core.samplers import sample_euler, sample_ode
from modules.core.settings import (at_most, fail, fraction, is_power_of_two, non_negative, power_of_two, scale_range,
                                   setting, time_interval)
from modules.core.wavelet import wavelet_loss

# Shortcut targets and the intermediate teacher point are clipped here, as in the paper's code.
SHORTCUT_CLIP = 4.0


@dataclass
class ShortcutConfig:
    # The flow part uses the finest level log2 M. The paper calls it d = 0, the official code
    # d = 1/M: the same embedding index, queried by the finest bootstrap level's teacher and by
    # M-step sampling either way, so there is nothing to switch.
    denoise_timesteps: int = setting(128, power_of_two, at_most(1 << 16))   # M: finest step is 1/M
    bootstrap_fraction: float = setting(0.25, fraction(low_open=True, high_open=True))
    teacher_ema_decay: float = setting(0.95, fraction(high_open=True))      # 0: the online model teaches
    bootstrap_cfg: bool = False
    cfg_scale: float = setting(1.5, non_negative)       # training guidance scale used with bootstrap_cfg
    # iSM (arXiv 2510.21250) intrinsic guidance: the guidance scale w is a network input, drawn per row
    # uniformly from guidance_range; flow targets are guided, w (x1 - x0) + (1 - w) v_uncond, for t in
    # guidance_interval and plain outside it; bootstrap targets ask the teacher at the row's w.
    intrinsic_guidance: bool = False
    guidance_range: tuple[float, float] = setting((1.0, 3.0), scale_range)
    guidance_interval: tuple[float, float] = setting((0.25, 1.0), time_interval)
    # iSM's multi-level Haar wavelet loss on the prediction error, every sub-band weighted equally
    # (modules/core/wavelet.py: wavelet_loss); 0: the plain mean squared error.
    wavelet_levels: int = setting(0, non_negative, at_most(8))

    @property
    def num_levels(self) -> int:
        """log2 M: bootstrap levels are 0 .. log2 M - 1, the flow rows use level log2 M."""
        return self.denoise_timesteps.bit_length() - 1


def num_bootstrap(batch_size: int, fraction: float, num_levels: int) -> int:
    """Rows of a batch that get self-consistency targets.

    round(B * fraction), but at least 1 and at most B - 1 when B >= 2, so both parts are
    always present; 0 when B == 1 or when there is no bootstrap level (M == 1).
    """
    if batch_size < 2 or num_levels == 0:
        return 0
    return min(max(int(math.floor(batch_size * fraction + 0.5)), 1), batch_size - 1)


def bootstrap_levels(n: int, num_levels: int, generator: Optional[torch.Generator],
                     device: torch.device, index: Optional[int] = None) -> torch.Tensor:
    """Levels k in 0..num_levels-1 for ``n`` bootstrap rows, stratified.

    Row i gets (offset + i) mod num_levels: with n >= num_levels every level is present and
    the counts differ by at most one; with fewer rows the levels are distinct. The offset
    is (index * n) mod num_levels when the micro-batch ``index`` is given (deterministic
    rotation: all levels appear within ceil(num_levels / n) consecutive micro-batches), else
    uniform random (each level equally likely in every batch).
    """
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if index is not None:
        offset = (index * n) % num_levels
    else:
        offset = int(randint(num_levels, 1, generator, torch.device("cpu")).item())
    return (offset + torch.arange(n, device=device)) % num_levels


@dataclass
class ShortcutBatch:
    """Inputs and regression targets of one shortcut training batch (flow rows first)."""

    x_t: torch.Tensor
    t: torch.Tensor                 # [B] float
    level: torch.Tensor             # [B] long, step size d = 2^-level
    target: torch.Tensor
    drop: Optional[torch.Tensor]    # [B] bool, True = null condition; None without a condition
    is_bootstrap: torch.Tensor      # [B] bool
    noise: torch.Tensor             # x0 of every row
    num_flow: int                   # rows 0 .. num_flow - 1 are flow rows
    guidance: Optional[torch.Tensor] = None   # [B] float guidance scale w (intrinsic guidance), else None


def _teacher_velocity(teacher: ModelCall, x: torch.Tensor, t: torch.Tensor, level: torch.Tensor,
                      cond: Optional[torch.Tensor], guided_rows: torch.Tensor, scale: float,
                      guidance: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Teacher velocity; rows in ``guided_rows`` get v_u + w (v_c - v_u) on the same x (bootstrap_cfg);
    ``guidance``: the scale each row asks an intrinsically guided teacher for (never with guided rows)."""
    n = x.shape[0]
    keep = None if cond is None else torch.zeros(n, dtype=torch.bool, device=x.device)
    if guided_rows.numel() == 0:
        return teacher(x, t, level=level, cond=cond, drop=keep, **guidance_kw(guidance)).to(x.dtype)
    # One doubled forward: all rows conditional, plus the guided rows again with the null condition.
    rows = torch.cat([torch.arange(n, device=x.device), guided_rows])
    drop = torch.cat([keep, torch.ones(guided_rows.numel(), dtype=torch.bool, device=x.device)])
    out = teacher(x[rows], t[rows], level=level[rows], cond=cond[rows.to(cond.device)], drop=drop).to(x.dtype)
    v, v_uncond = out[:n].clone(), out[n:]
    v[guided_rows] = v_uncond + scale * (v[guided_rows] - v_uncond)
    return v


def shortcut_targets(teacher: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
                     cfg: "ShortcutConfig", cond_drop: float = 0.0, generator: Optional[torch.Generator] = None,
                     index: Optional[int] = None, noise: Optional[torch.Tensor] = None) -> ShortcutBatch:
    """Build the shortcut batch of SPEC section 5 (no gradient flows through the teacher).

    Rows 0..B-B_b-1 are flow rows: level log2 M, t = i/M, target x1 - x0, condition
    dropout. Rows B-B_b..B-1 are bootstrap rows: level k stratified over 0..log2 M - 1,
    t = j 2^-k with t + 2^-k <= 1, real condition, target from two half steps of the
    teacher at level k + 1. ``cond`` keeps the row order of ``x1``; ``index`` is
    :attr:`Draws.index`; ``noise`` is :attr:`Draws.noise` (None: drawn).

    With ``cfg.intrinsic_guidance`` every row gets a guidance scale w, uniform in
    ``cfg.guidance_range`` (1 on dropped rows: the null condition has no guidance); flow rows
    with the real condition and t in ``cfg.guidance_interval`` regress w (x1 - x0) + (1 - w) v_u,
    v_u the teacher's unconditional velocity (whose expectation given x_t is the guided velocity
    v_u + w (v_c - v_u)), and the bootstrap rows' teacher is asked at the row's w, so every level
    learns the guidance of the finest one instead of compounding it.
    """
    m = cfg.denoise_timesteps
    num_levels = cfg.num_levels
    b = x1.shape[0]
    n_boot = num_bootstrap(b, cfg.bootstrap_fraction, num_levels)
    n_flow = b - n_boot
    device = x1.device

    noise = noise_for(x1, Draws(generator, noise=noise))
    t_flow = randint(m, n_flow, generator, device).float() / m
    level_boot = bootstrap_levels(n_boot, num_levels, generator, device, index)
    d_boot = torch.pow(2.0, -level_boot.float())
    # j uniform in [0, 2^k): floor of a uniform draw scaled per row, so t + d <= 1.
    j = torch.floor(rand(n_boot, generator, device) * torch.pow(2.0, level_boot.float()))
    t_boot = j * d_boot
    t = torch.cat([t_flow, t_boot])
    level = torch.cat([torch.full((n_flow,), num_levels, dtype=torch.long, device=device), level_boot])
    is_bootstrap = torch.arange(b, device=device) >= n_flow

    drop = None
    if cond is not None:
        drop = torch.zeros(b, dtype=torch.bool, device=device)
        drop[:n_flow] = rand(n_flow, generator, device) < cond_drop

    guidance = None
    if cfg.intrinsic_guidance:
        low, high = cfg.guidance_range
        guidance = low + (high - low) * rand(b, generator, device)
        if drop is not None:
            guidance = torch.where(drop, 1.0, guidance)

    tb = per_row(t, x1)
    x_t = (1 - tb) * noise + tb * x1
    target = torch.empty_like(x1)
    target[:n_flow] = x1[:n_flow] - noise[:n_flow]
    if guidance is not None and cond is not None:
        low, high = cfg.guidance_interval
        rows = torch.nonzero((t_flow >= low) & (t_flow <= high) & ~drop[:n_flow]).flatten()
        if rows.numel():
            ones = torch.ones(rows.numel(), device=device)
            with torch.no_grad():
                v_null = teacher(x_t[rows], t[rows], level=level[rows], cond=cond[rows.to(cond.device)],
                                 drop=ones.bool(), guidance=ones).to(x1.dtype)
            w = per_row(guidance[rows], x1)
            target[rows] = w * target[rows] + (1 - w) * v_null

    if n_boot:
        xb, tb_boot = x_t[n_flow:], t_boot
        half = per_row(d_boot / 2, x1)
        cond_boot = None if cond is None else cond[n_flow:]
        guided_rows = torch.zeros(0, dtype=torch.long, device=device)
        if cfg.bootstrap_cfg and cond is not None and cfg.cfg_scale != 1.0:
            guided_rows = torch.nonzero(level_boot == num_levels - 1).flatten()
        w_boot = None if guidance is None else guidance[n_flow:]
        with torch.no_grad():
            v1 = _teacher_velocity(teacher, xb, tb_boot, level_boot + 1, cond_boot, guided_rows, cfg.cfg_scale,
                                   w_boot)
            x_mid = torch.clamp(xb + half * v1, -SHORTCUT_CLIP, SHORTCUT_CLIP)
            v2 = _teacher_velocity(teacher, x_mid, tb_boot + d_boot / 2, level_boot + 1, cond_boot,
                                   guided_rows, cfg.cfg_scale, w_boot)
            target[n_flow:] = torch.clamp((v1 + v2) / 2, -SHORTCUT_CLIP, SHORTCUT_CLIP)

    return ShortcutBatch(x_t=x_t, t=t, level=level, target=target.detach(), drop=drop,
                         is_bootstrap=is_bootstrap, noise=noise, num_flow=n_flow, guidance=guidance)


class Shortcut(Objective):
    """Flow matching plus shortcut self-consistency.

    ``teacher`` gives the model call that builds the bootstrap targets (see
    :data:`modules.core.objectives.base.Teacher`); None: the online model teaches (still without
    gradient). ``wavelet_levels`` > 0 replaces each row's mean squared error by iSM's multi-level
    wavelet loss.
    """
    name = "shortcut"
    Config = ShortcutConfig
    samplers = ("shortcut", "euler", "heun")
    switches = ("intrinsic_guidance", "wavelet_levels")

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.cfg.wavelet_levels:
            return wavelet_loss(pred.float() - target.float(), self.cfg.wavelet_levels)
        return mse_per_sample(pred, target)

    def loss(self, net: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        """Targets from the teacher, then one forward with gradient on the whole batch; MSE over
        all rows. ``logs`` has no "loss_bootstrap" when the batch has no bootstrap row (B == 1 or M == 1);
        "loss_by_level" is the mean loss of the rows of each step-size level (NaN where a level has
        no row; level log2 M holds the flow rows). Nothing here waits for the device."""
        with (self.teacher() if self.teacher is not None else nullcontext(net)) as teacher:
            batch = shortcut_targets(teacher, x1, cond, self.cfg, self.cond_drop, draws.generator, draws.index,
                                     draws.noise)
        pred = net(batch.x_t, batch.t, level=batch.level, cond=cond, drop=batch.drop, **guidance_kw(batch.guidance))
        per_sample = self.per_sample(pred, batch.target)
        loss = per_sample.mean()
        detached = per_sample.detach()
        logs = {"loss_flow": detached[:batch.num_flow].mean()}
        if batch.num_flow < x1.shape[0]:
            logs["loss_bootstrap"] = detached[batch.num_flow:].mean()
        levels = self.cfg.num_levels + 1
        sums = torch.zeros(levels, device=detached.device).index_add_(0, batch.level, detached)
        counts = torch.zeros(levels, device=detached.device).index_add_(0, batch.level, torch.ones_like(detached))
        logs["loss_by_level"] = sums / counts
        return loss, logs

    # ---- what the network and the run need

    @staticmethod
    def network_inputs(cfg: ShortcutConfig) -> NetworkInputs:
        """The step-size level (levels 0 .. log2 M), and the guidance scale with intrinsic guidance."""
        return NetworkInputs(step="level", levels=cfg.num_levels + 1, guidance=cfg.intrinsic_guidance)

    @staticmethod
    def teacher_decay(cfg: ShortcutConfig) -> float:
        return cfg.teacher_ema_decay

    @staticmethod
    def trains_guidance(cfg: ShortcutConfig) -> bool:
        return cfg.intrinsic_guidance or (cfg.bootstrap_cfg and cfg.cfg_scale != 1)

    @staticmethod
    def check(cfg: ShortcutConfig, run, prefix: str) -> None:
        if not cfg.intrinsic_guidance:
            return
        if run.cond.type == "none":
            raise fail(f"{prefix}shortcut.intrinsic_guidance", "needs a conditional model (cond.type=class, "
                       "mask or text): guidance mixes conditional and unconditional velocities")
        low, high = cfg.guidance_range
        if not low <= 1 <= high:
            raise fail(f"{prefix}shortcut.guidance_range", f"must include 1 (no guidance: what dropped rows, "
                       f"evaluation and the default --cfg-scale use), got {cfg.guidance_range}")
        if cfg.bootstrap_cfg:
            raise fail(f"{prefix}shortcut.bootstrap_cfg", "and shortcut.intrinsic_guidance are two ways to "
                       "train guidance in; choose one")

    @staticmethod
    def sizes_problem(cfg: ShortcutConfig, sizes: Sizes) -> Optional[str]:
        levels = cfg.wavelet_levels
        if levels and sizes.latent_size % 2 ** levels:
            return (f"shortcut.wavelet_levels={levels} Haar levels halve the latents {levels} times: the latent "
                    f"size {sizes.latent_size} is not divisible by {2 ** levels}")
        return None

    # ---- sampling and evaluation

    @staticmethod
    def eval_steps(cfg: ShortcutConfig) -> tuple[int, ...]:
        return tuple(sorted({1, min(4, cfg.denoise_timesteps), cfg.denoise_timesteps}))

    @staticmethod
    def steps_problem(cfg: ShortcutConfig, sampler: str, steps: int) -> Optional[str]:
        m = cfg.denoise_timesteps
        if sampler == "shortcut" and (not is_power_of_two(steps) or steps > m):
            rule = (f"shortcut sampling needs a power of two between 1 and the model's denoise_timesteps={m} "
                    f"(1, 2, 4, ..., {m})")
            if is_power_of_two(steps):
                return f"{steps} steps exceeds the trained maximum of {m}: {rule}"
            return f"{rule}, got {steps}"
        return None

    @staticmethod
    def guidance_problem(cfg: ShortcutConfig, scale: float) -> Optional[str]:
        low, high = cfg.guidance_range
        if cfg.intrinsic_guidance and not low <= scale <= high:
            return (f"guidance scale {scale}: this model takes the scale as an input (shortcut.intrinsic_guidance) "
                    f"and was trained for {low} to {high} (shortcut.guidance_range)")
        return None

    @staticmethod
    def sample(cfg: ShortcutConfig, sampler: str, fn: ModelCall, noise: torch.Tensor, steps: int,
               generators: Optional[Sequence[torch.Generator]] = None, eta: float = 0.0) -> torch.Tensor:
        """``shortcut``: Euler steps that ask the network for their own size, x <- x + (1/steps)
        f(x, i/steps, level = log2 steps); ``euler``/``heun``: the flow ODE at the finest level (d = 1/M)."""
        level = steps.bit_length() - 1 if sampler == "shortcut" else cfg.num_levels
        levels = torch.full((noise.shape[0],), level, dtype=torch.long, device=noise.device)
        at_level = lambda x, t: fn(x, t, level=levels)  # noqa: E731
        if sampler == "shortcut":
            return sample_euler(at_level, noise, steps)
        return sample_ode(sampler, at_level, noise, steps)
