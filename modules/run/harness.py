"""The run harness: one small object between a training script and everything a run must survive.

    with Run("train_unet", cfg, args) as run:          # claims the output folder (a lock), makes the Accelerator
        net, optimizer = run.prepare(net, optimizer)
        run.start(identity, emas)                     # saves config.json, resumes --resume, starts the trackers
        for step in run.steps():                      # ends at train.max_steps, or after a stop signal's checkpoint
            ...forward, backward...
            update = run.update({"net": (optimizer, net.parameters())}, losses)
            ...EMA updates with update.finite...
            if run.every(cfg.train.log_every):
                run.log({...})
            if run.checkpoint_due():
                run.save_checkpoint()
                with run.exporting():
                    ...write the exports...

What it guarantees, whatever the script: the folder belongs to one run at a time; checkpoints
are atomic and carry the run's identity, checked before a resume; a resumed run repeats exactly
the steps an uninterrupted one would; SIGTERM, SIGINT and SIGHUP save a checkpoint and exit 0
at the end of the step; a non-finite loss or gradient skips the step on the device (the optimizer
step and its learning-rate schedule are here too), and
``train.max_bad_steps`` of them in a row save the last good state and exit 3; data that fails
mid-run saves the last step first; a failed write is one line that says what was kept.
No callbacks, no hooks: the script calls it, top to bottom.
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from modules import durable
from modules.core.ema import EMA
from modules.errors import DataError, TrainingAborted
from modules.run.accelerator import make_accelerator, network_of, network_state_dict, prepare_network
from modules.run.checkpoint import Checkpointer, RunIdentity, StopRequest, TrainingState
from modules.run.output_dir import claim_output_dir, save_run_config
from modules.run.tracking import (SampleGrid, Throughput, init_trackers, log_image, log_samples, memory_stats,
                                  note_export)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the optimizer step
#
# apply_update is called once per optimizer step, after the micro-batches' backward passes. It clips
# each parameter group's gradients, then applies the update only when every loss and gradient norm is
# finite. Where it can, the decision stays on the device: torch's fused Adam/AdamW takes a found_inf
# flag and skips the update in its kernel (step counter included), so the loop never waits for the
# device. Elsewhere the flag is read on the host: the non-fused optimizers, DeepSpeed (whose engine has
# already stepped inside backward) and fp16, whose GradScaler reads it itself and must see every step
# to adjust its scale. A skipped step leaves the weights as they were; the EMAs skip it with the same
# flag, and count_step counts it.

def lr_factor(step: int, cfg) -> float:
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
    finite: torch.Tensor                 # 0-d bool on the device; False: non-finite loss or gradient, step skipped
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


# ----------------------------------------------------------------------------- counting bad steps

def count_step(state: TrainingState, finite: torch.Tensor, cfg) -> Optional[tuple[int, int]]:
    """Advance the step counter and note whether the step was ``finite`` (a 0-d bool tensor, left on
    the device: no host read). The notes are read at logging and checkpoint steps and at the last
    step, where each skipped step is logged and counted. Returns (step, bad steps in a row there) of
    the first bad step at which ``train.max_bad_steps`` in a row were reached, else None: the abort
    may so come up to ``log_every`` steps after the limit was reached; the weights saved then are
    still the last good ones, since bad updates never apply."""
    state.step += 1
    state.unread.append((state.step, torch.as_tensor(finite)))
    if not (state.due(cfg.log_every, cfg.max_steps) or state.due(cfg.checkpoint_every, cfg.max_steps)):
        return None
    return next(((step, run) for step, run in state.count_unread() if run >= cfg.max_bad_steps), None)


def abort_on_bad_steps(state: TrainingState, limit: tuple[int, int], checkpointer: Checkpointer) -> None:
    """Save the state (the last good weights) and stop the run: ``limit`` bad steps in a row were reached."""
    checkpointer.save(state.step)
    step, run = limit
    later = (f" (step_{state.step}: steps are counted at logging and checkpoint steps)"
             if step != state.step else "")
    raise TrainingAborted(f"{run} consecutive non-finite steps at step {step}; saved the last good weights in "
                          f"{checkpointer.root}{later}")


class Run:
    """One training run's harness (see the module docstring). ``script`` names the run in its checkpoints;
    ``cfg`` is the resolved run config (its ``train`` section drives the loop); ``args`` the command line
    (``output_dir``, ``resume``, ``report_to``)."""

    def __init__(self, script: str, cfg, args):
        self.script, self.cfg, self.args = script, cfg, args
        self.output_dir = Path(args.output_dir)
        self.accelerator = make_accelerator(cfg.train, self.output_dir, args.report_to)
        self.state = TrainingState()
        self.checkpointer: Optional[Checkpointer] = None
        self._exit = contextlib.ExitStack()
        self._stop: Optional[StopRequest] = None
        self._progress: Optional[tqdm] = None
        self._stopping = False
        self._bad_steps: Optional[tuple[int, int]] = None
        self.throughput = Throughput(cfg.train.batch_size * cfg.train.grad_accum * self.accelerator.num_processes)

    # ---- the folder and the processes

    def __enter__(self) -> "Run":
        self._exit.enter_context(claim_output_dir(self.accelerator, self.output_dir, self.args.resume))
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if isinstance(error, DataError) and self.checkpointer is not None:
                # Data that failed mid-run (its folder vanished, every image unreadable): the last good
                # state first, then the one-line error. A DataLoader worker's error arrives with its
                # traceback in the message: keep the last line.
                self.checkpointer.save(self.state.step)
                reason = str(error).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")
                raise DataError(f"{reason}; saved step {self.state.step} in {self.checkpointer.root}: once the "
                                "data is back, continue with --resume latest") from None
        finally:
            self._exit.close()      # progress bar, signal handlers, the folder's lock
        if error is None:
            self.accelerator.end_training()

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def prepare(self, network: torch.nn.Module, *others):
        """``accelerator.prepare`` with the network's speed and memory switches (modules/run/accelerator.py)."""
        return prepare_network(self.accelerator, self.cfg.train, network, *others)

    def network(self, prepared: torch.nn.Module) -> torch.nn.Module:
        """The network inside what :meth:`prepare` returned (no DDP, FSDP or compile wrapper): what EMAs
        mirror, under the network's own parameter names."""
        return network_of(self.accelerator, prepared)

    def state_dict(self, prepared: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The full weights of a prepared network under its own names, compiled or not (a collective)."""
        return network_state_dict(self.accelerator, prepared)

    # ---- resume, and the loop

    def start(self, identity: RunIdentity, emas: Optional[dict[str, EMA]] = None, sharded_emas: bool = False) -> None:
        """Save the resolved config, continue ``--resume`` (checkpoints carry ``emas``, per process when
        ``sharded_emas``), start the trackers. After it, ``state.step`` is where the run stands."""
        tcfg = self.cfg.train
        self.checkpointer = Checkpointer(self.accelerator, self.output_dir, tcfg.keep_checkpoints, self.state,
                                         identity, emas, sharded_emas)
        save_run_config(self.accelerator, self.output_dir, self.cfg)
        self.checkpointer.load(self.args.resume)
        self.accelerator.step = 0  # resumes sit on an optimizer-step boundary, whatever grad_accum was
        init_trackers(self.accelerator, self.cfg, self.output_dir, self.args,
                      default_project=f"ldm-{self.script.removeprefix('train_')}")

    @property
    def finished(self) -> bool:
        """Whether no step is left (a run resumed after its last checkpoint, perhaps before its exports)."""
        return self.state.step >= self.cfg.train.max_steps

    def steps(self) -> Iterator[int]:
        """The steps still to do: yields the step about to be done, until ``train.max_steps`` or until the
        step at which a stop signal arrived has been checkpointed."""
        tcfg = self.cfg.train
        self._stop = self._exit.enter_context(StopRequest(self.accelerator))
        self._progress = self._exit.enter_context(tqdm(total=tcfg.max_steps, initial=self.state.step,
                                                       desc=self.script,
                                                       disable=not self.accelerator.is_local_main_process))
        while not self.finished:
            yield self.state.step
            self._progress.update(1)
            if self._bad_steps is not None:
                abort_on_bad_steps(self.state, self._bad_steps, self.checkpointer)
            if self._stopping:
                logger.info("%s received: saved step %d, exiting; continue with --resume latest",
                            self._stop.signal_name or "stop", self.state.step)
                return

    def update(self, groups: dict[str, tuple[torch.optim.Optimizer, Sequence[torch.Tensor]]],
               losses: Sequence[torch.Tensor]) -> Update:
        """One optimizer step of every ``name: (optimizer, parameters)`` group after the step's micro-batches:
        clipped to ``train.grad_clip``, skipped (on the device) when any loss or gradient is non-finite,
        counted. ``update.finite`` tells the EMAs whether to follow."""
        update = apply_update(self.accelerator, groups, losses, self.cfg.train.grad_clip)
        self._bad_steps = self._bad_steps or count_step(self.state, update.finite, self.cfg.train)
        self.throughput.tick()
        return update

    def every(self, n: int) -> bool:
        """Whether a thing done every ``n`` steps, and after the last step, is due now."""
        return self.state.due(n, self.cfg.train.max_steps)

    # ---- what a run leaves

    def log(self, scalars: dict[str, float], shown: str = "loss") -> None:
        """Tracker scalars of this step, with the harness's own (images/s, skipped steps, memory); ``shown``
        is the one the progress bar shows."""
        scalars = {**scalars, "images_per_s": self.throughput.rate(), "bad_steps": self.state.bad_steps,
                   **memory_stats(self.device)}
        self.accelerator.log(scalars, step=self.state.step)
        if self._progress is not None and shown in scalars:
            self._progress.set_postfix({shown: f"{scalars[shown]:.4f}"})

    def log_image(self, name: str, grid: torch.Tensor) -> None:
        """An image grid ([3, H, W] in [-1, 1]) to the trackers and ``images/`` (main process)."""
        log_image(self.accelerator, name, grid, self.state.step, self.output_dir)

    def log_samples(self, name: str, samples: SampleGrid) -> None:
        """Generated images to the trackers (their grid, and each with its caption) and ``images/`` (main process)."""
        log_samples(self.accelerator, name, samples, self.state.step, self.output_dir)

    def checkpoint_due(self) -> bool:
        """Whether this step is checkpointed: every ``train.checkpoint_every`` steps, at the last step, and
        when a stop signal arrived (every process learns of it at the same step: one all-reduce)."""
        self._stopping = self._stop.requested()
        return self.every(self.cfg.train.checkpoint_every) or self._stopping

    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.state.step)

    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """Around the writing of the exports: a failed write is one line that names what was kept; a finished
        one's step is noted for ``evaluate.py --log-to`` (``tracker.json``)."""
        with durable.failed_write_is(f"the exported models in {self.output_dir}",
                                     f"checkpoint step_{self.state.step} is saved and the previous exports are "
                                     "untouched"):
            yield
        if self.is_main:
            note_export(self.output_dir, self.state.step)
