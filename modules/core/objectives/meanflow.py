"""The MeanFlow objective (Geng et al., "Mean Flows for One-step Generative Modeling", arXiv 2505.13447).

In this project's time (t = 0 noise x0, t = 1 data x1, x_t = (1 - t) x0 + t x1, v = x1 - x0) the
network u(z, t, h) predicts the average velocity over [t, s], s = t + h >= t, of the flow's
trajectory z_tau through z_t = z:

    (s - t) u(z_t, t, s) = integral from t to s of v(z_tau, tau) dtau.

Differentiating in t with s held fixed: -u + (s - t) du/dt = -v, so the MeanFlow identity is

    u(z_t, t, s) = v(z_t, t) + (s - t) du/dt,    du/dt = (partial_z u) v + partial_t u   (s held fixed),

the total derivative along the trajectory: one Jacobian-vector product of (z, t, s) -> u along the
tangent (v, 1, 0). (The paper runs time the other way, t = 1 noise and r <= t, and writes
u = v - (t - r) du/dt with the tangent (v, 0, 1) on (z, r, t); tests/test_meanflow.py checks ours
against the closed form of Gaussian data.) The regression target v + (s - t) du/dt is
stop-gradient; the loss backpropagates through the primal output u only. Rows with s = t are
plain flow matching.

Choices (``meanflow.*``, the paper's defaults): t and s are the lower and higher of two
logit-normal draws, ``equal_fraction`` of the rows get s = t; each row's squared error summed
over its elements is weighted by 1 / (sq + c)^p (stop-gradient); guidance is folded into v.

As the official code trains it (github.com/Gsunshine/meanflow at d70cb55, meanflow.py; cited as
meanflow.py:LINE): the s = t rows are the first floor(B * equal_fraction) of the micro-batch
(meanflow.py:152-155); condition dropout takes as many rows as draws U < p, but the first ones
(meanflow.py:191-200), so dropped rows are s = t rows and the unconditional velocity trains at
h = 0 only, which is all the folded guidance asks of it (``meanflow.drop_rows=random`` drops the
drawn rows instead, see MeanFlowConfig); the guidance queries run with the network in eval mode
(``train=False``, meanflow.py:219), the JVP's forward in train mode. (Only the UNet's
``model.dropout`` differs between the modes here; the official DiT's only train-mode switch is its
label dropout, which it turns off, meanflow.py:96.) tests/test_meanflow.py checks the draws and
the loss against a transcription of that code.

The JVP runs with forward-mode autodiff (``torch.func.jvp``; ``torch.autograd.forward_ad`` under DDP
and FSDP1, see :func:`modules.core.objectives.base.average_velocity_jvp`), so attention takes SDPA's math backend inside it
(:func:`modules.core.attention.forward_ad_attention`). It runs in the run's precision:
under mixed precision Accelerate puts autocast inside the network's forward, so the tangent is bf16
there too (the official PyTorch code runs it in float32; ``train.mixed_precision=no`` does that
here). The UNet's GroupNorm and LayerNorm compute in float32 so that tangents keep the output's
dtype (modules/core/networks/unet.py).
Gradient checkpointing does not recompute tangents (torch refuses the recomputation), so the
config refuses it with this objective.

Sampled in MeanFlow steps (1 step: one forward from noise to data), or as a flow model at h = 0
(Euler, Heun).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.core.networks.denoiser import NetworkInputs
from modules.core.objectives.base import (Draws, Logs, ModelCall, Objective, average_velocity_jvp, eval_mode,
                                          first_rows_dropout, noise_for, num_equal, paired_times, per_row, rand)
from modules.core.samplers import sample_meanflow, sample_ode
from modules.core.settings import (at_least, at_most, fail, fraction, non_negative, one_of, positive, setting,
                                   time_interval)


@dataclass
class MeanFlowConfig:
    """MeanFlow (Geng et al., arXiv 2505.13447) in this project's time, t = 0 noise, t = 1 data: the
    network learns the average velocity over [t, s], s >= t. The paper's (t, r) are 1 - s, 1 - t here."""
    # t and s: the lower and the higher of two logit-normal draws; the paper's logit-normal(-0.4, 1.0)
    # over its reversed time is logit-normal(+0.4, 1.0) over ours.
    time_mean: float = setting(0.4, at_least(-10), at_most(10))
    time_std: float = setting(1.0, positive, at_most(10))
    equal_fraction: float = setting(0.75, fraction())      # the first floor(B * f) rows: s = t; the paper's best
    # Adaptive loss weight 1 / (||delta||^2 + c)^p on each row's squared error summed over its elements.
    loss_power: float = setting(1.0, non_negative, at_most(4))     # p; 0: the plain summed squared error
    loss_eps: float = setting(0.01, positive)                 # c: the official JAX code's (its CIFAR code: 1e-3)
    # Guidance folded into the target (the paper's appendix): v_g = omega v + kappa u(z, t, t | c)
    # + (1 - omega - kappa) u(z, t, t | null) for t in guidance_interval (our time: the paper's [a, b] is
    # [1 - b, 1 - a] here), v elsewhere and on dropped rows.
    omega: float = setting(1.0, non_negative, at_most(100))     # 1 with kappa 0: no guidance
    kappa: float = setting(0.0, fraction(high_open=True))
    guidance_interval: tuple[float, float] = setting((0.0, 1.0), time_interval)
    # Which rows condition dropout (cond.drop) takes: "first", the official code's (meanflow.py:191-200): the first
    # rows, which are s = t rows, so the unconditional velocity trains at h = 0 only, where the folded guidance
    # asks for it. "random": rows drawn independently of h, so the unconditional *average* velocity trains at
    # every h too, which two-branch guidance at sampling time (--cfg-scale on a model sampled in MeanFlow
    # steps) mixes in; a model trained with "first" never saw the null condition at h > 0.
    drop_rows: str = setting("first", one_of("first", "random"))

    @property
    def guided(self) -> bool:
        return self.omega != 1.0 or self.kappa != 0.0


@dataclass
class MeanFlowDraws:
    """The random choices of one micro-batch (:meth:`MeanFlow.draw`)."""
    t: torch.Tensor                       # [B] the lower time
    s: torch.Tensor                       # [B] the higher time (s = t on the first `equal` rows)
    drop: Optional[torch.Tensor]          # [B] bool, the null condition; None for an unconditional model
    equal: int                            # rows 0 .. equal - 1 have s = t


class MeanFlow(Objective):
    """MeanFlow: the network, called with ``interval = h = s - t``, learns the average velocity."""
    name = "meanflow"
    Config = MeanFlowConfig
    samplers = ("meanflow", "euler", "heun")
    switches = ("drop_rows",)

    def sample_times(self, n: int, generator: Optional[torch.Generator],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(t, s)``: the lower and higher of two logit-normal(time_mean, time_std) draws; the first
        ``floor(n * equal_fraction)`` rows get s = t (meanflow.py:147-157)."""
        return paired_times(n, self.cfg.time_mean, self.cfg.time_std, self.cfg.equal_fraction, generator, device)

    def draw(self, n: int, conditional: bool, generator: Optional[torch.Generator],
             device: torch.device) -> MeanFlowDraws:
        """The micro-batch's times and condition dropout (``meanflow.drop_rows``), from ``generator``."""
        t, s = self.sample_times(n, generator, device)
        if not conditional:
            drop = None
        elif self.cfg.drop_rows == "first":
            drop = first_rows_dropout(n, self.cond_drop, generator, device)
        else:
            drop = rand(n, generator, device) < self.cond_drop
        return MeanFlowDraws(t, s, drop, num_equal(n, self.cfg.equal_fraction))

    @torch.no_grad()
    def guided_velocity(self, model: ModelCall, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                        cond: Optional[torch.Tensor], drop: Optional[torch.Tensor]) -> torch.Tensor:
        """v_g = omega v + kappa u(x_t, t, t | c) + (1 - omega - kappa) u(x_t, t, t | null) on the rows with
        their condition and t in the guidance interval; v elsewhere. Its expectation given x_t is the
        CFG velocity v_u + omega / (1 - kappa) (v_c - v_u) once the network has learnt v_u and v_c."""
        cfg = self.cfg
        if cond is None or not cfg.guided:
            return v
        low, high = cfg.guidance_interval
        rows = torch.nonzero((t >= low) & (t <= high) & ~drop).flatten()
        if rows.numel() == 0:
            return v
        n = rows.numel()
        wide = torch.promote_types(v.dtype, torch.float32)     # float64 stays
        with eval_mode(model):      # the official queries run with train=False (meanflow.py:219)
            if cfg.kappa:   # one doubled forward: conditional, then null
                doubled = rows.repeat(2)
                null = torch.arange(2 * n, device=x_t.device) >= n
                out = model(x_t[doubled], t[doubled], interval=torch.zeros(2 * n, device=x_t.device),
                            cond=cond[doubled.to(cond.device)], drop=null).to(wide)
                u_cond, u_null = out[:n], out[n:]
            else:
                null = torch.ones(n, dtype=torch.bool, device=x_t.device)
                u_null = model(x_t[rows], t[rows], interval=torch.zeros(n, device=x_t.device),
                               cond=cond[rows.to(cond.device)], drop=null).to(wide)
                u_cond = torch.zeros_like(u_null)
        v_g = v.clone()
        v_g[rows] = (cfg.omega * v[rows] + cfg.kappa * u_cond + (1 - cfg.omega - cfg.kappa) * u_null).to(v.dtype)
        return v_g

    def loss(self, model: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        """Adaptive-weighted squared error of u against its MeanFlow target. ``logs``: "loss_flow" and
        "loss_interval", the unweighted mean squared error of the s = t rows and of the others (the
        weighted loss is about 1 whatever the fit, with p = 1), when the batch has such rows."""
        noise = noise_for(x1, draws)
        return self.loss_of(model, x1, noise, cond, self.draw(x1.shape[0], cond is not None, draws.generator,
                                                                x1.device))

    def loss_of(self, model: ModelCall, x1: torch.Tensor, x0: torch.Tensor, cond: Optional[torch.Tensor],
                d: MeanFlowDraws) -> tuple[torch.Tensor, Logs]:
        """The loss of data ``x1`` and noise ``x0`` under the choices ``d`` (meanflow.py:206-246)."""
        cfg = self.cfg
        tb = per_row(d.t, x1)
        x_t = (1 - tb) * x0 + tb * x1
        v = self.guided_velocity(model, x_t, d.t, x1 - x0, cond, d.drop)
        u, du_dt = average_velocity_jvp(model, x_t, d.t, d.s, v, cond, d.drop)
        target = (v + per_row(d.s - d.t, v) * du_dt).detach()    # the MeanFlow identity, stop-gradient
        wide = torch.promote_types(x1.dtype, torch.float32)           # at least float32 (float64 stays)
        squared = (u.to(wide) - target.to(wide)).pow(2).flatten(1).sum(1)
        weight = 1.0 / (squared.detach() + cfg.loss_eps) ** cfg.loss_power
        loss = (weight * squared).mean()
        mse = squared.detach() / u[0].numel()
        logs = {name: part.mean() for name, part in (("loss_flow", mse[:d.equal]), ("loss_interval", mse[d.equal:]))
                if part.numel()}
        return loss, logs

    # ---- what the network and the run need

    @staticmethod
    def network_inputs(cfg: MeanFlowConfig) -> NetworkInputs:
        return NetworkInputs(step="interval")

    @staticmethod
    def trains_guidance(cfg: MeanFlowConfig) -> bool:
        return cfg.guided

    @staticmethod
    def check(cfg: MeanFlowConfig, run, prefix: str) -> None:
        if run.train.gradient_checkpointing:
            raise fail(f"{prefix}train.gradient_checkpointing", "cannot be used with objective=meanflow: "
                       "torch's checkpointing does not recompute the forward-mode (JVP) tangents")
        if run.train.channels_last and run.model.arch == "unet":
            raise fail(f"{prefix}train.channels_last", "cannot be used with objective=meanflow on the UNet: "
                       "torch's forward-mode (JVP) GroupNorm refuses channels_last tensors")
        if cfg.guided and run.cond.type == "none":
            raise fail(f"{prefix}meanflow.omega", "guidance (meanflow.omega != 1 or meanflow.kappa != 0) needs "
                       "a conditional model (cond.type=class, mask or text)")

    # ---- sampling

    @staticmethod
    def sample(cfg: MeanFlowConfig, sampler: str, fn: ModelCall, noise: torch.Tensor, steps: int,
               generators: Optional[Sequence[torch.Generator]] = None, eta: float = 0.0) -> torch.Tensor:
        """``meanflow``: :func:`sample_meanflow`; ``euler``/``heun``: the flow ODE of u(z, t, h = 0), the
        instantaneous velocity."""
        if sampler == "meanflow":
            return sample_meanflow(fn, noise, steps)
        return sample_ode(sampler, lambda x, t: fn(x, t, interval=torch.zeros_like(t)), noise, steps)
