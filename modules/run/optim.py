"""The optimizer step of both training scripts: learning-rate schedule, clipping, skipping bad steps.

:func:`apply_update` is called once per optimizer step, after the micro-batches' backward
passes. It clips each parameter group's gradients, then applies the update only when every
loss and gradient norm is finite. Where it can, the decision stays on the device: torch's fused
Adam/AdamW takes a ``found_inf`` flag and skips the update in its kernel (step counter included),
so the loop never waits for the device. Elsewhere the flag is read on the host: the non-fused
optimizers, DeepSpeed (whose engine has already stepped inside ``backward``) and fp16, whose
GradScaler reads it itself and must see every step to adjust its scale. A skipped step leaves the
weights as they were; the caller skips the EMA updates with the same flag and counts the step
(``modules.checkpoint.count_step``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from modules.config.schema import TrainConfig


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
    finite: torch.Tensor                 # 0-d bool on the device; False: a non-finite loss or gradient, the step was skipped
    grad_norms: dict[str, torch.Tensor]  # per parameter group, before clipping


def skips_on_device(accelerator: Accelerator, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` can skip a bad step without a host read: torch's fused Adam/AdamW
    (``_step_supports_amp_scaling``: it reads ``found_inf`` in its kernel), outside DeepSpeed."""
    inner = getattr(optimizer, "optimizer", optimizer)   # inside accelerate's AcceleratedOptimizer
    return (accelerator.distributed_type != DistributedType.DEEPSPEED and bool(inner.defaults.get("fused"))
            and getattr(inner, "_step_supports_amp_scaling", False))


def step_unless_bad(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """One step of a fused Adam/AdamW that its kernel skips, step counter included, when ``finite`` is
    False; the flag is passed the way torch.amp.GradScaler passes it."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.found_inf = (~finite).float()
    try:
        optimizer.step()
    finally:
        del inner.found_inf


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
        # fp16: the GradScaler skips non-finite steps itself (a host read) and must see every step.
        for optimizer in optimizers:
            optimizer.step()
        finite = torch.tensor(not any(optimizer.step_was_skipped for optimizer in optimizers),
                              device=accelerator.device)
    else:
        checked = torch.stack([torch.as_tensor(x, dtype=torch.float32).reshape(()).to(accelerator.device)
                               for x in [*losses, *norms.values()]])
        finite = torch.isfinite(checked).all()
        if all(skips_on_device(accelerator, optimizer) for optimizer in optimizers):
            for optimizer in optimizers:
                step_unless_bad(optimizer, finite)
        elif bool(finite):   # a host read: these optimizers cannot skip on the device
            for optimizer in optimizers:
                optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return Update(finite, norms)
