"""What every objective file provides (:class:`Objective`), and the helpers they share.

An objective owns everything that depends on it: its config section (``Config``, the run config's
section of the same name), what the network must embed besides the latents and the time
(:meth:`Objective.network_inputs`), whether it needs a teacher EMA, its targets and loss
(:meth:`Objective.loss`), its samplers (the first is the default) and the step counts they accept,
the step counts evaluation scores by default, and its rules against the rest of the run config.
The training loop, sampling and evaluation ask the objective, never its name.

Every network is called as ``net(x, t, level=None, interval=None, cond=None, drop=None)`` with ``t``
a float in [0, 1] (flow convention: 0 noise, 1 data; DDPM passes timestep / num_timesteps), plus
``guidance=w`` for a network with a guidance-scale input only (so any other model function keeps
the shorter call). ``cond`` is only ever passed through or indexed by batch row. Every random
choice comes from :class:`Draws`, so a micro-batch's training is a pure function of its seed and
place in the run. Configs are validated where they are built; objectives trust them.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch.func import jvp

from modules.core.attention import forward_ad_attention
from modules.core.networks.denoiser import NetworkInputs, Sizes
from modules.core.settings import time_interval

ModelCall = Callable[..., torch.Tensor]
Logs = dict[str, torch.Tensor]
# How an objective runs its teacher: a context in which it gets the teacher's model call (for the
# EMA teacher: the training network with the EMA weights swapped in).
Teacher = Callable[[], AbstractContextManager]


# ----------------------------------------------------------------------------- the randomness of a micro-batch

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


def num_equal(batch_size: int, fraction: float) -> int:
    """Rows with s = t in the MeanFlow family: floor(B * fraction), Python's int() as the official code
    (MeanFlow's meanflow.py:152, iMF's imf.py:134)."""
    return int(batch_size * fraction)


def paired_times(n: int, mean: float, std: float, equal_fraction: float, generator: Optional[torch.Generator],
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t, s)`` of the MeanFlow family: the lower and higher of two logit-normal(mean, std) draws; the first
    :func:`num_equal` rows get s = t (MeanFlow's meanflow.py:147-157, iMF's imf.py:127-135)."""
    z = torch.randn(2, n, generator=generator, device=draw_device(generator, device)).to(device)
    pair = torch.sigmoid(mean + std * z)
    t, s = pair.min(dim=0).values, pair.max(dim=0).values
    equal = torch.arange(n, device=device) < num_equal(n, equal_fraction)
    return t, torch.where(equal, t, s)


def unit_intervals(n: int, device: torch.device) -> torch.Tensor:
    """``[n, 2]`` rows of the interval [0, 1], made on ``device`` (no copy from the host in a training step)."""
    return torch.stack((torch.zeros(n, device=device), torch.ones(n, device=device)), dim=1)


def first_rows_dropout(n: int, cond_drop: float, generator: Optional[torch.Generator],
                       device: torch.device) -> torch.Tensor:
    """Condition dropout as the official MeanFlow and iMF code draws it (meanflow.py:191-200, imf.py:279-284):
    as many rows as draws U < p, but the *first* rows of the micro-batch, not the drawn ones. Those are the
    s = t rows (they come first), so the unconditional velocity trains at h = 0 only."""
    count = (rand(n, generator, device) < cond_drop).sum()
    return torch.arange(n, device=device) < count


@contextmanager
def eval_mode(model: "ModelCall") -> Iterator[None]:
    """``model`` in eval mode inside (each submodule's mode restored after): the official MeanFlow code makes
    its guidance queries with ``train=False`` (meanflow.py:219). A plain function passes unchanged."""
    training = [m for m in model.modules() if m.training] if isinstance(model, torch.nn.Module) else []
    for module in training:
        module.training = False
    try:
        yield
    finally:
        for module in training:
            module.training = True


# ----------------------------------------------------------------------------- what objectives share

def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def guidance_kw(guidance: Optional[torch.Tensor]) -> dict:
    """The ``guidance`` keyword of a model call: given only to a network with a guidance-scale input."""
    return {} if guidance is None else {"guidance": guidance}


# ----------------------------------------------------------------------------- the MeanFlow family's JVP

def _runs_forward_ad(model: ModelCall) -> Optional[torch.nn.Module]:
    """The module to run with ``torch.autograd.forward_ad`` when ``model`` is DDP or FSDP1 (compiled or not),
    whose forwards fail inside ``torch.func.jvp`` (DDP's bucket rebuild and FSDP1's flat parameters need
    real storage); None for the rest. That skips torch.compile's wrapper, which cannot trace dual
    tensors; FSDP2's autograd Functions, which have no forward-mode formula, go through torch.func."""
    inner = getattr(model, "_orig_mod", model)            # torch.compile's wrapper
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel
    return inner if isinstance(inner, (DistributedDataParallel, FullyShardedDataParallel)) else None


def average_velocity_jvp(model: ModelCall, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                         cond: Optional[torch.Tensor] = None, drop: Optional[torch.Tensor] = None,
                         has_aux: bool = False, **inputs) -> tuple[torch.Tensor, ...]:
    """``(u, du/dt)``: the network's average velocity u(x_t, t, h = s - t), with gradient, and its total
    derivative along the flow, one JVP of (z, t, s) -> u along the tangent (v, 1, 0), attention on the
    math backend (module docstring). ``inputs``: the model's further keyword inputs, held fixed (no
    tangent). ``has_aux``: the model returns ``(u, aux)``, and the result is ``(u, du/dt, aux)``, aux with
    its gradient and without a tangent (improved MeanFlow's v-head output, modules/core/objectives/imf.py)."""
    dtype = x_t.dtype
    t, s, v = t.to(dtype), s.to(dtype), v.to(dtype)
    wrapped = _runs_forward_ad(model)
    with forward_ad_attention():
        if wrapped is None:
            return jvp(lambda z, t_, s_: model(z, t_, interval=s_ - t_, cond=cond, drop=drop, **inputs), (x_t, t, s),
                       (v, torch.ones_like(t), torch.zeros_like(s)), has_aux=has_aux)
        with fwad.dual_level():
            t_dual = fwad.make_dual(t, torch.ones_like(t))
            out = wrapped(fwad.make_dual(x_t, v), t_dual, interval=s - t_dual, cond=cond, drop=drop, **inputs)
            if not has_aux:
                return fwad.unpack_dual(out)
            u, aux = out
            return (*fwad.unpack_dual(u), fwad.unpack_dual(aux).primal)


class Objective:
    """One training objective of the stage-2 network; subclasses fill in the class attributes and
    override what differs from these defaults (no step input, no teacher, no guidance of its own)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    samplers: ClassVar[tuple[str, ...]]        # the samplers that fit it; the first is the default
    # Fields of Config that change training only under this objective: set under another, they are refused.
    switches: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg, cond_drop: float = 0.0, teacher: Optional[Teacher] = None):
        self.cfg = cfg
        self.cond_drop = cond_drop
        self.teacher = teacher

    def loss(self, net: ModelCall, x1: torch.Tensor, cond: Optional[torch.Tensor],
             draws: Draws) -> tuple[torch.Tensor, Logs]:
        """The training loss of one micro-batch of latents ``x1`` and its logs (tensors, left on the device)."""
        raise NotImplementedError

    # ---- what the network and the run need

    @staticmethod
    def network_inputs(cfg) -> NetworkInputs:
        return NetworkInputs()

    @staticmethod
    def teacher_decay(cfg) -> float:
        """The decay of the EMA whose weights teach (0: no teacher EMA)."""
        return 0.0

    @staticmethod
    def trains_guidance(cfg) -> bool:
        """Whether training folds guidance in (it then needs the unconditional prediction: cond.drop > 0)."""
        return False

    @staticmethod
    def check(cfg, run, prefix: str) -> None:
        """Rules between this section and the rest of the run config ``run`` (raise ``fail(key, why)``)."""

    @staticmethod
    def sizes_problem(cfg, sizes: Sizes) -> Optional[str]:
        """Why latents of ``sizes`` cannot train under this section, or None."""
        return None

    # ---- sampling and evaluation

    @staticmethod
    def eval_steps(cfg) -> tuple[int, ...]:
        """The step counts FID is measured at when ``eval.steps`` is not given."""
        return (1, 4, 128)

    @classmethod
    def sampling_problem(cls, cfg, sampler: str, steps: int) -> Optional[str]:
        """Why a model trained under ``cfg`` cannot be sampled so, or None: the one home of these rules."""
        if sampler not in cls.samplers:
            return f"sampler {sampler} does not fit a {cls.name} model (use one of {', '.join(cls.samplers)})"
        if steps < 1:
            return f"steps must be an integer >= 1, got {steps}"
        return cls.steps_problem(cfg, sampler, steps)

    @staticmethod
    def steps_problem(cfg, sampler: str, steps: int) -> Optional[str]:
        return None

    @staticmethod
    def guidance_problem(cfg, scale: float) -> Optional[str]:
        """Why a model trained under ``cfg`` cannot be sampled at guidance ``scale``, or None."""
        return None

    @staticmethod
    def default_guidance(cfg) -> float:
        """The guidance scale to sample at when the caller names none (1: the conditional prediction alone)."""
        return 1.0

    @staticmethod
    def default_guidance_interval(cfg) -> Optional[tuple[float, float]]:
        """The guidance interval ``(low, high)`` (this project's time) to sample with when the caller names
        none; None for a model that takes none. A model that takes one gets it as ``sample``'s
        ``guidance_interval`` keyword."""
        return None

    @classmethod
    def guidance_interval_problem(cls, cfg, interval: tuple[float, float]) -> Optional[str]:
        """Why a model trained under ``cfg`` cannot be sampled with the guidance ``interval``, or None."""
        if cls.default_guidance_interval(cfg) is None:
            return f"a {cls.name} model takes no guidance interval (only objective=imf's network takes one)"
        return time_interval(tuple(interval))

    @staticmethod
    def sample(cfg, sampler: str, fn: ModelCall, noise: torch.Tensor, steps: int,
               generators: Optional[Sequence[torch.Generator]] = None, eta: float = 0.0) -> torch.Tensor:
        """Latents from ``noise`` in ``steps`` steps of ``sampler`` (checked by :meth:`sampling_problem`);
        ``fn(x, t, **inputs)`` is the (guided) network."""
        raise NotImplementedError
