"""The optimizer step of both training scripts: learning-rate schedule, clipping, skipping bad steps.

:func:`apply_update` is called once per optimizer step, after the micro-batches' backward
passes. It clips each parameter group's gradients, then applies the update only when every
loss and gradient norm is finite; under fp16 the GradScaler makes that decision itself (it must
see every step to adjust its scale). A skipped step leaves the weights as they were, and the
caller counts it (``modules.checkpoint.count_step``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from accelerate import Accelerator

from modules.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at optimizer step ``step``: linear warmup, then the schedule.

    Computed from the global step rather than a stepped scheduler object, so it is the same
    for any number of processes and after a resume.
    """
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, cfg.max_steps - cfg.lr_warmup_steps)
    progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def clipped_grad_norm(accelerator: Accelerator, parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip gradients to ``max_norm`` (0: no clipping) and return their global norm as a tensor.

    DeepSpeed clips inside its engine (``gradient_clipping`` in its config) and reports no
    norm here; the returned 0 then means "unknown", and only the loss is checked for NaN.
    """
    norm = accelerator.clip_grad_norm_(parameters, max_norm or float("inf"))
    return torch.zeros((), device=accelerator.device) if norm is None else torch.as_tensor(norm)


@dataclass
class Update:
    applied: bool                        # False: a non-finite loss or gradient; the step was skipped
    grad_norms: dict[str, torch.Tensor]  # per parameter group, before clipping


def apply_update(accelerator: Accelerator, groups: dict[str, tuple[torch.optim.Optimizer, Iterable[torch.Tensor]]],
                 losses: Sequence[torch.Tensor], max_norm: float) -> Update:
    """Clip, step and zero every ``name: (optimizer, parameters)`` group, unless the step is bad.

    ``losses`` are the step's (detached) losses, all micro-batches' included, so a NaN in any
    of them skips the step even where no gradient norm is reported.
    """
    if not accelerator.sync_gradients:
        raise RuntimeError("apply_update: call it after the last micro-batch of an optimizer step")
    norms = {name: clipped_grad_norm(accelerator, params, max_norm) for name, (_, params) in groups.items()}
    optimizers = [optimizer for optimizer, _ in groups.values()]
    if accelerator.scaler is not None:
        # fp16: the GradScaler skips non-finite steps itself and must see every step.
        for optimizer in optimizers:
            optimizer.step()
        applied = not any(optimizer.step_was_skipped for optimizer in optimizers)
    else:
        checked = torch.stack([torch.as_tensor(x, dtype=torch.float32).reshape(()).to(accelerator.device)
                               for x in [*losses, *norms.values()]])
        applied = bool(torch.isfinite(checked).all())
        if applied:
            for optimizer in optimizers:
                optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return Update(applied, norms)
