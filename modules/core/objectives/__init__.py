"""Training objectives for the latent network: flow matching, shortcut models and DDPM (MeanFlow
is in modules/meanflow.py).

Every objective is one class with one call, ``loss(model, x1, cond, draws) -> (loss, logs)``:
the training loop calls nothing else, so a new objective is a new class. Objectives hold no
weights and no training state (the trainer owns networks, EMAs and optimizers); the shortcut
objective is given, at construction, how to run its teacher. Every network is called as
``model(x, t, level=None, cond=None, drop=None)`` with ``t`` a float in [0, 1] (flow
convention: 0 noise, 1 data; DDPM passes timestep / num_timesteps), plus ``guidance=w`` for a
network with a guidance-scale input only (so any other model function keeps the 5-argument
call). ``cond`` is only ever passed through or indexed by batch row. :class:`Draws` makes every
random choice reproducible. Configs are validated where they are built (modules/config.py);
objectives trust them.
"""
from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from modules.config.schema import DDPMConfig, FlowConfig, ShortcutConfig, UNetRunConfig
from modules.core.draws import Draws, broadcast, condition_dropout, draw_device, noise_for, rand, randint
from modules.core.objectives.meanflow import MeanFlowObjective
from modules.core.wavelet import wavelet_loss

ModelCall = Callable[..., torch.Tensor]
Logs = dict[str, torch.Tensor]
# How the shortcut objective runs its teacher: a context in which it gets the teacher's model
# call (for the EMA teacher: the training network with the EMA weights swapped in).
Teacher = Callable[[], AbstractContextManager]


# Shortcut targets and the intermediate teacher point are clipped here, as in the paper's code.
SHORTCUT_CLIP = 4.0


def _mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def guidance_kw(guidance: Optional[torch.Tensor]) -> dict:
    """The ``guidance`` keyword of a model call: given only to a network with a guidance-scale input."""
    return {} if guidance is None else {"guidance": guidance}


# ----------------------------------------------------------------------------- flow

class FlowObjective:
    """Flow matching: x_t = (1 - t) x0 + t x1, regress the velocity x1 - x0."""

    def __init__(self, cfg: FlowConfig, cond_drop: float = 0.0):
        self.cfg = cfg
        self.cond_drop = cond_drop

    def sample_t(self, n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
        if self.cfg.time_sampling == "logit_normal":
            # SD3's logit-normal(0, 1): more weight on the middle of the path.
            z = torch.randn(n, generator=generator, device=draw_device(generator, device)).to(device)
            return torch.sigmoid(z)
        return rand(n, generator, device)

    def loss(self, model: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        generator = draws.generator
        noise = noise_for(x1, draws)
        t = self.sample_t(x1.shape[0], generator, x1.device)
        drop = condition_dropout(x1.shape[0], cond, self.cond_drop, generator, x1.device)
        tb = broadcast(t, x1)
        x_t = (1 - tb) * noise + tb * x1
        pred = model(x_t, t, level=None, cond=cond, drop=drop)
        loss = _mse_per_sample(pred, x1 - noise).mean()
        return loss, {"loss_flow": loss.detach()}


# ----------------------------------------------------------------------------- shortcut

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
                     cfg: ShortcutConfig, cond_drop: float = 0.0, generator: Optional[torch.Generator] = None,
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

    tb = broadcast(t, x1)
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
            w = broadcast(guidance[rows], x1)
            target[rows] = w * target[rows] + (1 - w) * v_null

    if n_boot:
        xb, tb_boot = x_t[n_flow:], t_boot
        half = broadcast(d_boot / 2, x1)
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


class ShortcutObjective:
    """Flow matching plus shortcut self-consistency (Frans et al., ICLR 2025).

    ``teacher`` gives the model call that builds the bootstrap targets (see :data:`Teacher`);
    None: the online model teaches (still without gradient). ``wavelet_levels`` > 0 replaces each
    row's mean squared error by iSM's multi-level wavelet loss (:func:`modules.wavelet.wavelet_loss`).
    """

    def __init__(self, cfg: ShortcutConfig, cond_drop: float = 0.0, teacher: Optional[Teacher] = None,
                 wavelet_levels: int = 0):
        self.cfg = cfg
        self.cond_drop = cond_drop
        self.teacher = teacher
        self.wavelet_levels = wavelet_levels

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.wavelet_levels:
            return wavelet_loss(pred.float() - target.float(), self.wavelet_levels)
        return _mse_per_sample(pred, target)

    def loss(self, model: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        """Targets from the teacher, then one forward with gradient on the whole batch; MSE over
        all rows. ``logs`` has no "loss_bootstrap" when the batch has no bootstrap row (B == 1 or M == 1);
        "loss_by_level" is the mean loss of the rows of each step-size level (NaN where a level has
        no row; level log2 M holds the flow rows). Nothing here waits for the device."""
        with (self.teacher() if self.teacher is not None else nullcontext(model)) as teacher:
            batch = shortcut_targets(teacher, x1, cond, self.cfg, self.cond_drop, draws.generator, draws.index,
                                     draws.noise)
        pred = model(batch.x_t, batch.t, level=batch.level, cond=cond, drop=batch.drop, **guidance_kw(batch.guidance))
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


# ----------------------------------------------------------------------------- ddpm

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
        return broadcast(abar.sqrt(), x) * x + broadcast((1 - abar).sqrt(), x) * noise


class DDPMObjective:
    """Epsilon prediction; the network sees t = timestep / num_timesteps."""

    def __init__(self, cfg: DDPMConfig, cond_drop: float = 0.0):
        self.cfg = cfg
        self.cond_drop = cond_drop
        self.schedule = DDPMSchedule.from_config(cfg)

    def loss(self, model: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        generator = draws.generator
        noise = noise_for(x1, draws)
        timesteps = randint(self.schedule.num_timesteps, x1.shape[0], generator, x1.device)
        drop = condition_dropout(x1.shape[0], cond, self.cond_drop, generator, x1.device)
        x_t = self.schedule.add_noise(x1, noise, timesteps)
        pred = model(x_t, timesteps.float() / self.schedule.num_timesteps, level=None, cond=cond, drop=drop)
        loss = _mse_per_sample(pred, noise).mean()
        return loss, {"loss_ddpm": loss.detach()}


# ----------------------------------------------------------------------------- factory

Objective = FlowObjective | ShortcutObjective | DDPMObjective | MeanFlowObjective


def build_objective(run_cfg: UNetRunConfig, teacher: Optional[Teacher] = None) -> Objective:
    """The objective of ``run_cfg``; ``teacher`` is the shortcut teacher (None: the online model)."""
    cond_drop = run_cfg.cond.drop if run_cfg.cond.type != "none" else 0.0
    if run_cfg.objective == "shortcut":
        return ShortcutObjective(run_cfg.shortcut, cond_drop, teacher, run_cfg.loss.wavelet_levels)
    if run_cfg.objective == "flow":
        return FlowObjective(run_cfg.flow, cond_drop)
    if run_cfg.objective == "meanflow":
        return MeanFlowObjective(run_cfg.meanflow, cond_drop)
    return DDPMObjective(run_cfg.ddpm, cond_drop)
