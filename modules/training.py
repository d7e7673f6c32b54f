"""Loop mechanics shared by ``train_vae.py`` and ``train_unet.py``.

The training scripts read top to bottom (setup, loop, checkpoint, log); what they share
lives here: the command line, the Accelerator, the learning-rate schedule, reproducible
per-step randomness, atomic checkpoints with resume, pre-emption signals, non-finite
step guarding and tracker logging.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from safetensors import SafetensorError

from modules.config import ConfigError, TrainConfig, diff_fields, load_config, save_json, to_dict

logger = logging.getLogger("modules.training")

MANIFEST = "manifest.json"
STATE_NAME = "training_state.json"
TRACKERS = ("wandb", "tensorboard", "mlflow", "none")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or resumed from."""


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite steps); state was saved."""


# ----------------------------------------------------------------------------- command line

def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Trailing key=value words override config fields, e.g. train.lr=2e-4 model.base_channels=64.")
    parser.add_argument("--config", default=None, help="preset name in configs/<stage>/ or a JSON file")
    parser.add_argument("--data", default=None, help="image folder, save_to_disk folder or hub dataset name")
    parser.add_argument("--output-dir", required=True, help="run folder: config, checkpoints, exports, logs")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides train.max_steps)")
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest valid checkpoint in the output dir, if any) or a checkpoint folder")
    parser.add_argument("--report-to", default="wandb", choices=TRACKERS, help="experiment tracker")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def resolve_run_config(args: argparse.Namespace, cls, stage: str):
    """Preset + overrides + command-line flags; when resuming, the saved config is the base."""
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    saved = Path(args.output_dir) / "config.json"
    if args.resume and saved.is_file() and args.config is None:
        return load_config(cls, stage, str(saved), overrides)
    return load_config(cls, stage, args.config, overrides)


def run_cli(main: Callable[[list[str] | None], None], argv: Optional[list[str]] = None) -> None:
    """Run a script's main; expected user errors print one line instead of a traceback."""
    from modules.data import DataError
    from modules.export import ModelFolderError
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    try:
        main(argv)
    except (ConfigError, DataError, ModelFolderError, CheckpointError, TrainingAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if not isinstance(e, TrainingAborted) else 3)


# ----------------------------------------------------------------------------- accelerator

def make_accelerator(cfg: TrainConfig, output_dir: Path, report_to: str) -> Accelerator:
    mixed_precision = None if cfg.mixed_precision == "auto" else cfg.mixed_precision
    # Several processes on a machine without GPUs: accelerate only wires them up (gloo) when
    # told to use the CPU; otherwise each process silently trains alone.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_processes,
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # A peer that dies must not leave the others blocked in a collective forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.process_timeout_s))],
    )
    if accelerator.is_main_process:
        logger.info("%d process(es), distributed type %s, device %s, mixed precision %s",
                    accelerator.num_processes, accelerator.distributed_type.value, accelerator.device,
                    accelerator.mixed_precision)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # We feed our own data loader, so DeepSpeed cannot infer the micro-batch size.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    return accelerator


def prepare_output_dir(accelerator: Accelerator, output_dir: Path, run_config, resume: Optional[str],
                       model_sections: tuple[str, ...]) -> None:
    """Create the run folder and save the resolved config; refuse to mix two runs in one folder.

    A resumed run must build the same network as the one it continues: a change in
    ``model_sections`` of the config is refused, naming the fields, before any state is loaded.
    """
    config_path = output_dir / "config.json"
    if resume and config_path.is_file():
        changed = model_changes(json.loads(config_path.read_text()), to_dict(run_config), model_sections)
        if changed:
            raise CheckpointError(f"cannot resume {output_dir}: its checkpoints were made with another model "
                                  f"config ({'; '.join(changed)})")
    # Checks run on every process (each raises alike), so no process is left waiting at a barrier.
    if any((output_dir / "checkpoints").glob("step_*")) and not resume:
        raise CheckpointError(f"output dir {output_dir} already holds checkpoints; "
                              "pass --resume latest to continue it or choose another --output-dir")
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_json(run_config, config_path)
        except OSError as e:
            raise CheckpointError(f"cannot write to output dir {output_dir} ({e.strerror or e})") from None
    accelerator.wait_for_everyone()


def init_trackers(accelerator: Accelerator, project: str, run_config, output_dir: Path, report_to: str) -> None:
    if report_to == "none":
        return
    flat = _flatten_for_tracker(to_dict(run_config))
    init_kwargs = {"wandb": {"dir": str(output_dir), "name": output_dir.name}} if report_to == "wandb" else {}
    accelerator.init_trackers(project, config=flat, init_kwargs=init_kwargs)


def _flatten_for_tracker(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_for_tracker(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v) if isinstance(v, (list, tuple)) or v is None else v
    return out


# ----------------------------------------------------------------------------- schedule and randomness

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


SHARED_STREAM = -1  # ``rank`` of the stream every process draws alike (global-batch noise)


def step_generator(seed: int, step: int, micro_step: int, rank: int, device: torch.device) -> torch.Generator:
    """Randomness of one micro-batch as a pure function of (seed, step, micro step, rank).

    Noise, time and dropout draws then do not depend on what ran before (logging, validation,
    a resume), which is what makes an interrupted run finish with identical weights. Pass
    ``SHARED_STREAM`` as the rank for the stream all processes share; it never equals a
    process's own stream.
    """
    g = torch.Generator(device=device)
    g.manual_seed((((seed * 1_000_003 + step) * 1_009 + micro_step) * 65_537 + rank + 1) % 2 ** 63)
    return g


def process_share_randn(shape: tuple[int, ...], shared: torch.Generator, rank: int, world_size: int) -> torch.Tensor:
    """This process's rows of standard normal noise drawn for the whole global batch.

    ``shared`` must be seeded identically on every process. Each sample then gets the same
    noise whether the global batch runs on one process or is split over several.
    """
    full = torch.randn((world_size * shape[0], *shape[1:]), generator=shared, device=shared.device)
    return full[rank * shape[0]:(rank + 1) * shape[0]]


def model_changes(saved: dict, new: dict, sections: tuple[str, ...]) -> list[str]:
    """Differences between two run configs inside the given (dotted) sections."""
    return [line for line in diff_fields(saved, new)
            if any(line.startswith(f"{s}.") or line.startswith(f"{s}:") for s in sections)]


# ----------------------------------------------------------------------------- state and checkpoints

@dataclass
class TrainingState:
    """Counters that must survive a resume (saved with every checkpoint)."""
    step: int = 0                     # optimizer steps done
    bad_steps: int = 0                # non-finite steps skipped in total
    consecutive_bad_steps: int = 0
    substituted_images: int = 0       # unreadable images replaced at load time

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


# A write that fails (disk full, quota, read-only or vanished folder) surfaces as OSError from
# Python, RuntimeError from torch.save and SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _write_failure(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}; is the disk full?"


def export_or_fail(export: Callable[[], None], output_dir: Path, step: int) -> None:
    """Run ``export`` (written after checkpoint ``step``); a failed write is a CheckpointError."""
    try:
        export()
    except WRITE_ERRORS as e:
        raise CheckpointError(f"could not write the exported models in {output_dir} ({_write_failure(e)}); "
                              f"checkpoint step_{step} is saved and the previous exports are untouched") from None


def checkpoint_if_due(state: TrainingState, cfg: TrainConfig, stop: "StopRequest", checkpointer: "Checkpointer",
                      export: Callable[[], None], output_dir: Path) -> bool:
    """Checkpoint and export every ``checkpoint_every`` steps, at the last step and when a stop
    signal arrived; returns True when the run must stop now."""
    stopping = stop.requested()
    if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps or stopping:
        checkpointer.save(state.step)
        export_or_fail(export, output_dir, state.step)
    if stopping:
        logger.info("%s received: saved step %d, exiting; continue with --resume latest",
                    stop.signal_name or "stop", state.step)
    return stopping


def count_step(state: TrainingState, finite: bool, max_bad_steps: int, checkpointer: "Checkpointer") -> None:
    """Advance the step counter; a non-finite step (its update was skipped) is counted, and
    ``max_bad_steps`` of them in a row save the last good state and abort the run."""
    state.step += 1
    if finite:
        state.consecutive_bad_steps = 0
        return
    state.bad_steps += 1
    state.consecutive_bad_steps += 1
    logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                   state.step, state.consecutive_bad_steps)
    if state.consecutive_bad_steps >= max_bad_steps:
        checkpointer.save(state.step)
        raise TrainingAborted(f"{state.consecutive_bad_steps} consecutive non-finite steps at step {state.step}; "
                              f"saved the last good weights in {checkpointer.root}")


class Checkpointer:
    """``checkpoints/step_N`` folders written atomically, the newest ``keep`` kept.

    A checkpoint is written into ``checkpoints/.tmp_step_N``, a manifest of every file and its
    size is written last, then the folder is renamed. A folder counts as a checkpoint only if
    its manifest is present and every listed file has its recorded size, so a half-written or
    truncated checkpoint is never chosen for a resume. The counters of ``state`` are stored as
    JSON rather than registered with Accelerate, which would unpickle them without restriction:
    a resume never runs code from a checkpoint's files.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, keep: int, state: TrainingState,
                 extra_save: Callable[[Path], None] = lambda path: None,
                 extra_load: Callable[[Path], None] = lambda path: None):
        self.accelerator = accelerator
        self.root = output_dir / "checkpoints"
        self.keep = keep
        self.state = state
        self.extra_save = extra_save
        self.extra_load = extra_load

    def save(self, step: int) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        try:
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            self.extra_save(tmp)
            if acc.is_main_process:
                (tmp / STATE_NAME).write_text(json.dumps(self.state.state_dict()))
            acc.wait_for_everyone()
            if acc.is_main_process:
                files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
                _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                _fsync_dir(self.root)
                self._prune()
        except WRITE_ERRORS as e:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({_write_failure(e)}); "
                                  "the previous checkpoints are untouched") from None
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for _, path in self.valid()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def valid(self) -> list[tuple[int, Path]]:
        """(step, folder) of complete checkpoints, oldest first."""
        found = []
        for path in self.root.glob("step_*"):
            problem = checkpoint_problem(path)
            if problem is None:
                found.append((int(path.name.split("_", 1)[1]), path))
        return sorted(found)

    def resolve(self, resume: Optional[str]) -> list[Path]:
        """Checkpoints to try for ``--resume``, best first ([] = start fresh)."""
        if not resume:
            return []
        if resume != "latest":
            path = Path(resume)
            problem = checkpoint_problem(path)
            if problem:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
            return [path]
        for path in sorted(self.root.glob("step_*"), key=_step_of, reverse=True):
            problem = checkpoint_problem(path)
            if problem:
                logger.warning("skipping checkpoint %s: %s", path, problem)
        return [path for _, path in reversed(self.valid())]

    def load(self, resume: Optional[str]) -> Optional[Path]:
        """Load the newest loadable checkpoint; falls back to older ones and says so."""
        candidates = self.resolve(resume)
        if resume == "latest" and not candidates:
            logger.info("--resume latest: no checkpoint in %s, starting from scratch", self.root)
        for i, path in enumerate(candidates):
            try:
                self.accelerator.load_state(str(path))
                self.extra_load(path)
                self.state.load_state_dict(json.loads((path / STATE_NAME).read_text()))
                logger.info("resumed from %s", path)
                return path
            except Exception as e:  # a damaged file raises whatever its reader raises
                if resume != "latest" or i == len(candidates) - 1:
                    raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
                logger.warning("checkpoint %s failed to load (%s: %s); falling back to %s",
                               path, type(e).__name__, e, candidates[i + 1])
        return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    manifest = path / MANIFEST
    if not path.is_dir():
        return "no such folder"
    if not manifest.is_file():
        return f"no {MANIFEST} (the checkpoint was not finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_", 1)[1])
    except ValueError:
        return -1


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- signals and guards

class StopRequest:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint at the next step and exits 0.

    In a multi-process run every process must take the same decision at the same step, so
    the flag is combined across processes with an all-reduce (one scalar per step).
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.signal_name: Optional[str] = None
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        flag = self.signal_name is not None
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)


def clipped_grad_norm(accelerator: Accelerator, parameters, max_norm: float) -> torch.Tensor:
    """Clip gradients to ``max_norm`` (0: no clipping) and return their global norm as a tensor.

    DeepSpeed clips inside its engine (``gradient_clipping`` in its config) and reports no
    norm here; the returned 0 then means "unknown", and only the loss is checked for NaN.
    """
    norm = accelerator.clip_grad_norm_(parameters, max_norm or float("inf"))
    return torch.zeros((), device=accelerator.device) if norm is None else torch.as_tensor(norm)


# ----------------------------------------------------------------------------- logging

class Throughput:
    """Images per second over the last logging window, across all processes."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.start = time.perf_counter()
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.steps * self.images_per_step / max(now - self.start, 1e-9)
        self.start, self.steps = now, 0
        return value


def memory_stats(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30}
    return {}


def log_image(accelerator: Accelerator, name: str, grid: torch.Tensor, step: int, output_dir: Path) -> None:
    """Log an image grid ([3,H,W] in [-1,1]) to the trackers and save it as a PNG in the run."""
    if not accelerator.is_main_process:
        return
    from PIL import Image
    array = ((grid.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    folder = output_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(folder / f"{name.replace('/', '_')}_{step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            tracker.log({name: wandb.Image(array)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image(name, array, step, dataformats="HWC")
        elif tracker.name == "mlflow":
            import mlflow
            mlflow.log_image(array, f"{name.replace('/', '_')}_{step:07d}.png")


def make_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Stack rows of images ([N,3,H,W] each, same N) into one [3, H', W'] grid in [-1, 1]."""
    n, c, h, w = rows[0].shape
    grid = torch.full((c, len(rows) * (h + pad) + pad, n * (w + pad) + pad), -1.0)
    for r, row in enumerate(rows):
        for i in range(n):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[:, top:top + h, left:left + w] = row[i].detach().float().cpu()
    return grid
