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
at the end of the step; a non-finite loss or gradient skips the step on the device, and
``train.max_bad_steps`` of them in a row save the last good state and exit 3; data that fails
mid-run saves the last step first; a failed write is one line that says what was kept.
No callbacks, no hooks: the script calls it, top to bottom.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from modules import durable
from modules.core.ema import EMA
from modules.errors import DataError, TrainingAborted
from modules.run.accelerator import make_accelerator, prepare_network
from modules.run.checkpoint import Checkpointer, RunIdentity, StopRequest, TrainingState
from modules.run.optim import Update, apply_update
from modules.run.output_dir import claim_output_dir, save_run_config
from modules.run.tracking import Throughput, init_trackers, log_image, memory_stats

logger = logging.getLogger(__name__)


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
        init_trackers(self.accelerator, f"ldm-{self.script.removeprefix('train_')}", self.cfg, self.output_dir,
                      self.args.report_to)

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

    def checkpoint_due(self) -> bool:
        """Whether this step is checkpointed: every ``train.checkpoint_every`` steps, at the last step, and
        when a stop signal arrived (every process learns of it at the same step: one all-reduce)."""
        self._stopping = self._stop.requested()
        return self.every(self.cfg.train.checkpoint_every) or self._stopping

    def save_checkpoint(self) -> Path:
        return self.checkpointer.save(self.state.step)

    @contextlib.contextmanager
    def exporting(self) -> Iterator[None]:
        """Around the writing of the exports: a failed write is one line that names what was kept."""
        with durable.failed_write_is(f"the exported models in {self.output_dir}",
                                     f"checkpoint step_{self.state.step} is saved and the previous exports are "
                                     "untouched"):
            yield
