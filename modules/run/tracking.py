"""What a run reports: tracker setup (wandb, tensorboard, mlflow), image grids, throughput, memory.

Reports are never state: an image that cannot be written (a full disk) is a warning, and the
run goes on to its next checkpoint, which fails cleanly if the disk is still full.

Where a run reports is chosen at its first start and kept in ``OUTPUT_DIR/tracker.json``: the
project (``--tracker-project``, ``$WANDB_PROJECT``), the W&B entity, the run's name and the W&B run
id (``$WANDB_RUN_ID``, as a W&B sweep agent sets it, else a new one). A resume reads it back, so a
training run is one W&B run (``resume="allow"``) and one TensorBoard folder however often it is
resumed; a resumed run logs the steps after its checkpoint, which follow the ones logged before it.
Each export notes its step there, and ``evaluate.py --log-to RUN_DIR`` logs its scores into the
same tracker run at that step (:func:`log_scores`, :func:`log_sweep`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import logging
import math
import netrc
import os
import secrets
import string
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from accelerate import Accelerator

from modules import durable
from modules.config.io import to_dict
from modules.data.image_io import make_grid, save_png, to_uint8
from modules.durable import WRITE_ERRORS, write_failure
from modules.errors import ConfigError
from modules.run.layout import TRACKER_LOGS, TRACKER_RECORD
from modules.run.model_card import markdown_table
from modules.run.output_dir import LOCK_NAME

logger = logging.getLogger(__name__)
TRACKERS_WITH_RECORD = ("wandb", "tensorboard", "mlflow")
NAME_LIMIT = 128                        # W&B's limit for project names
RESERVED = "/\\#?%:;,'"                 # refused by W&B in projects or run ids; a project is also a folder name
MAX_RECORD_BYTES = 64 * 1024
CAPTION_LIMIT = 200                     # characters of a prompt shown under an image
EVAL_STEP = "eval/export_step"          # the x axis of evaluate.py's scores in a W&B run


def check_tracker(args: argparse.Namespace) -> None:
    """Refuse, before anything runs, a tracker that would fail after setup, and names it would refuse."""
    report_to = args.report_to
    if report_to in ("tensorboard", "mlflow") and importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"--report-to {report_to}: the {report_to} package is not installed "
                          f"(pip install {report_to}, or choose --report-to wandb or none)")
    if report_to == "wandb" and not _wandb_offline() and not _wandb_api_key():
        raise ConfigError("--report-to wandb: no wandb API key on this machine; run `wandb login` (or set "
                          "WANDB_API_KEY), or set WANDB_MODE=offline to log locally, or pass --report-to none")
    if report_to == "none":
        return
    names = [_given(args.tracker_project, "--tracker-project", "WANDB_PROJECT" if report_to == "wandb" else None),
             _given(args.tracker_entity, "--tracker-entity", "WANDB_ENTITY"),
             _given(None, "", "WANDB_RUN_ID" if report_to == "wandb" else None)]
    for (value, source), kind in zip(names, ("project", "entity", "run id")):
        problem = value is not None and name_problem(value)
        if problem:
            raise ConfigError(f"{source} {value!r}: not a usable tracker {kind} ({problem})")
    name, source = _given(args.tracker_run_name, "--tracker-run-name", "WANDB_NAME")
    if name is not None and (not name.strip() or len(name) > NAME_LIMIT or not name.isprintable()):
        raise ConfigError(f"{source} {name!r}: a run name is 1 to {NAME_LIMIT} printable characters")


def _given(flag_value: Optional[str], flag: str, variable: Optional[str]) -> tuple[Optional[str], str]:
    """(the value, where it came from): the flag, else the environment variable, else (None, "")."""
    if flag_value is not None:
        return flag_value, flag
    if variable and os.environ.get(variable):
        return os.environ[variable], f"${variable}"
    return None, ""


def name_problem(value: str) -> Optional[str]:
    """Why ``value`` cannot be a tracker project, entity or W&B run id (None when it can)."""
    if not value.strip() or value != value.strip():
        return "empty, or spaces at either end"
    if len(value) > NAME_LIMIT:
        return f"{len(value)} characters, at most {NAME_LIMIT}"
    bad = sorted({c for c in value if c in RESERVED or not c.isprintable()})
    if bad:
        return f"holds {''.join(bad)!r}; none of {RESERVED} or control characters may appear"
    if value in (".", ".."):
        return "not a folder name"
    return None


def _wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")


def _wandb_api_key() -> bool:
    """Whether wandb will find an API key: the environment, or a netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


# ----------------------------------------------------------------------------- the run's tracker record

@dataclass
class TrackerRecord:
    """``OUTPUT_DIR/tracker.json``: where a training run reports, kept across resumes."""
    report_to: str                      # the tracker of its latest start
    project: str
    run_name: str
    entity: Optional[str] = None        # None: the W&B account's default entity
    wandb_id: Optional[str] = None      # set once the run has reported to W&B
    exported_step: Optional[int] = None  # the step of its newest export


def read_tracker_record(run_dir: Path) -> Optional[TrackerRecord]:
    """The record of a run folder; None when it has none; raises ValueError(why) when it is damaged."""
    path = Path(run_dir) / TRACKER_RECORD
    if not path.exists() and not path.is_symlink():
        return None
    if path.is_symlink() or not path.is_file():
        raise ValueError("not a regular file")
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise ValueError(f"{path.stat().st_size} bytes, not a tracker record")
    value = durable.read_json(path)
    fields = {f.name for f in dataclasses.fields(TrackerRecord)}
    if not isinstance(value, dict) or not {"report_to", "project", "run_name"} <= set(value) <= fields:
        raise ValueError(f"not a tracker record (a JSON object with the keys {', '.join(sorted(fields))})")
    record = TrackerRecord(**value)
    if record.report_to not in TRACKERS_WITH_RECORD:
        raise ValueError(f"report_to {record.report_to!r} is none of {', '.join(TRACKERS_WITH_RECORD)}")
    for key in ("project", "entity", "wandb_id"):
        item = getattr(record, key)
        problem = ("not a string" if not isinstance(item, str) else name_problem(item)) \
            if item is not None or key == "project" else None
        if problem:
            raise ValueError(f"{key} {item!r}: {problem}")
    if not isinstance(record.run_name, str) or len(record.run_name) > NAME_LIMIT:
        raise ValueError(f"run_name {record.run_name!r}: not a run name")
    step = record.exported_step
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"exported_step {step!r}: not a step")
    return record


def _write_record(run_dir: Path, record: TrackerRecord) -> None:
    durable.write_json(Path(run_dir) / TRACKER_RECORD, dataclasses.asdict(record), sync=True)


def new_wandb_id() -> str:
    """``$WANDB_RUN_ID`` (a W&B sweep agent sets it), else 8 random letters and digits as W&B makes them."""
    return os.environ.get("WANDB_RUN_ID") or "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                      for _ in range(8))


def tracker_record(output_dir: Path, args: argparse.Namespace, default_project: str) -> TrackerRecord:
    """Where this start reports (main process): the kept record when resuming, else a new one; written
    (durably) whenever it changes, before the tracker starts, so a resume finds it whatever happens next."""
    project, project_source = _given(args.tracker_project, "--tracker-project",
                                     "WANDB_PROJECT" if args.report_to == "wandb" else None)
    entity, entity_source = _given(args.tracker_entity, "--tracker-entity", "WANDB_ENTITY")
    run_name, _ = _given(args.tracker_run_name, "--tracker-run-name", "WANDB_NAME")
    path = output_dir / TRACKER_RECORD
    saved = None
    if args.resume:
        try:
            saved = read_tracker_record(output_dir)
        except ValueError as e:
            logger.warning("%s: %s; this run now reports to a new tracker run (the steps logged before stay in the "
                           "earlier one)", path, e)
    if saved is None:
        record = TrackerRecord(args.report_to, project or default_project, run_name or output_dir.name, entity)
    else:
        for key, wanted, source in (("project", project, project_source), ("entity", entity, entity_source)):
            if wanted is not None and wanted != getattr(saved, key):
                logger.warning("%s %s: this run reports to %s %r (%s), so its resumes stay in one place; to report "
                               "elsewhere, start a new run", source, wanted, key, getattr(saved, key), path)
        record = dataclasses.replace(saved, report_to=args.report_to, run_name=run_name or saved.run_name)
    if args.report_to == "wandb":
        kept_id = os.environ.get("WANDB_RUN_ID")
        if record.wandb_id is None:
            record.wandb_id = new_wandb_id()
        elif kept_id and kept_id != record.wandb_id:
            logger.warning("$WANDB_RUN_ID %s: this run continues its W&B run %s (%s)", kept_id, record.wandb_id, path)
    if record != saved:
        durable.write_or_fail(lambda: _write_record(output_dir, record), str(path),
                              "nothing was trained yet: free some space and start again")
    return record


def note_export(output_dir: Path, step: int) -> None:
    """Record the step of the newest export (what ``evaluate.py --log-to`` logs at). A report: a record
    that cannot be read or written is a warning."""
    try:
        record = read_tracker_record(output_dir)
        if record is not None and record.exported_step != step:
            _write_record(output_dir, dataclasses.replace(record, exported_step=step))
    except (ValueError, *WRITE_ERRORS) as e:
        logger.warning("could not note the export of step %d in %s (%s); evaluate.py --log-to would log its "
                       "scores at an older step", step, output_dir / TRACKER_RECORD,
                       e if isinstance(e, ValueError) else write_failure(e))


def init_trackers(accelerator: Accelerator, run_config, output_dir: Path, args: argparse.Namespace,
                  default_project: str) -> None:
    """Start the tracker of ``--report-to`` (main process) where the run's record says it reports."""
    if args.report_to == "none" or not accelerator.is_main_process:
        return
    record = tracker_record(output_dir, args, default_project)
    flat = _flatten_for_tracker(to_dict(run_config))
    init_kwargs = {}
    if args.report_to == "wandb":
        init_kwargs = {"wandb": {"dir": str(output_dir), "name": record.run_name, "id": record.wandb_id,
                                 "resume": "allow", **({"entity": record.entity} if record.entity else {})}}
    try:
        accelerator.init_trackers(record.project, config=flat, init_kwargs=init_kwargs)
    except Exception as e:
        if args.report_to != "wandb" or not _is_wandb_error(e):
            raise
        raise ConfigError(f"W&B could not start run {record.wandb_id} of project {record.project} ({e}); "
                          f"if that run was deleted, remove {output_dir / TRACKER_RECORD} to report to a new one, or "
                          "pass --report-to none") from None
    logger.info("reporting to %s: project %s, run %s%s", args.report_to, record.project, record.run_name,
                f" (W&B id {record.wandb_id})" if args.report_to == "wandb" else "")


def _is_wandb_error(error: Exception) -> bool:
    import wandb
    return isinstance(error, wandb.errors.Error)


def _flatten_for_tracker(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten_for_tracker(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v) if isinstance(v, (list, tuple)) or v is None else v
    return out


@dataclass
class SampleGrid:
    """Generated images for the trackers: one row per setting (``row_names``, e.g. a sampling step count), one
    column per condition (``captions``: a class name and label, a prompt); ``masks`` ([N, 1, H, W] in {0, 1}):
    the columns' mask conditions, drawn over their images in W&B."""
    rows: list[torch.Tensor]            # [N, 3, H, W] in [-1, 1] each
    row_names: list[str]
    captions: list[str]
    masks: Optional[torch.Tensor] = None

    def describe(self) -> str:
        return f"rows: {', '.join(self.row_names)}; columns: {'; '.join(_short(c) for c in self.captions)}"

    def each(self) -> Iterator[tuple[np.ndarray, str, Optional[np.ndarray]]]:
        """Every image, row by row: (uint8 [H, W, 3], its caption: condition and row, its mask condition as
        uint8 [H, W] in {0, 1} at the image's size, or None)."""
        masks = None
        for row, row_name in zip(self.rows, self.row_names):
            pixels = to_uint8(row)
            if masks is None:       # every row has the same size: the masks are resized once
                masks = [None] * len(pixels) if self.masks is None else torch.nn.functional.interpolate(
                    self.masks.float().cpu(), size=pixels.shape[1:3], mode="nearest")[:, 0].round().to(
                    torch.uint8).numpy()
            for image, caption, mask in zip(pixels, self.captions, masks):
                yield image, " | ".join(filter(None, (_short(caption), row_name))), mask


def condition_captions(cond_type: str, latent_set, indices, num_classes: int) -> list[str]:
    """What each grid column is conditioned on, picked as ``modules.core.generation.conditions`` picks it:
    classes in turn (name and label), the captions or masks of the first images of ``latent_set``."""
    indices = list(indices)
    if cond_type == "class":
        names = latent_set.spec.class_names
        return [f"{names[c]} (class {c})" if c < len(names) else f"class {c}" for c in (i % num_classes
                                                                                         for i in indices)]
    if cond_type == "text":
        return [latent_set.caption(i % len(latent_set)) for i in indices]
    if cond_type == "mask":
        return [f"mask {i % len(latent_set)}" for i in indices]
    return ["" for _ in indices]


def _short(text: str) -> str:
    return text if len(text) <= CAPTION_LIMIT else text[:CAPTION_LIMIT - 3] + "..."


def log_samples(accelerator: Accelerator, name: str, samples: SampleGrid, step: int, output_dir: Path) -> None:
    """Log generated images: their grid (trackers and ``images/``) and, in W&B, each image with its caption."""
    log_image(accelerator, name, make_grid(samples.rows), step, output_dir, samples)


def log_image(accelerator: Accelerator, name: str, grid: torch.Tensor, step: int, output_dir: Path,
              samples: Optional[SampleGrid] = None) -> None:
    """Log an image grid ([3,H,W] in [-1,1]) to the trackers and save it as a PNG in the run; with ``samples``
    (what the grid shows), W&B also gets each image with its caption, TensorBoard the captions as text."""
    if not accelerator.is_main_process:
        return
    array = to_uint8(grid)
    file_name = f"{name.replace('/', '_')}_{step:07d}.png"
    try:
        folder = output_dir / "images"
        folder.mkdir(parents=True, exist_ok=True)
        save_png(array, folder / file_name)
    except WRITE_ERRORS as e:
        logger.warning("could not write the image %s (%s); training goes on", file_name, write_failure(e))
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            images = {name: wandb.Image(array, caption=_short(samples.describe()) if samples else None)}
            if samples is not None:
                images[f"{name}/each"] = _captioned_images(samples)
            tracker.log(images, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image(name, array, step, dataformats="HWC")
            if samples is not None:
                tracker.writer.add_text(f"{name}/captions", "  \n".join(
                    [f"rows: {', '.join(samples.row_names)}"] +
                    [f"column {i + 1}: {_short(c) or '-'}" for i, c in enumerate(samples.captions)]), step)
        elif tracker.name == "mlflow":
            import mlflow
            mlflow.log_image(array, file_name)


def _captioned_images(samples: SampleGrid) -> list:
    """One ``wandb.Image`` per image of the grid (no more: the grid's count bounds the cost)."""
    import wandb
    return [wandb.Image(pixels, caption=caption, masks=None if mask is None else
                        {"condition": {"mask_data": mask, "class_labels": {0: "background", 1: "mask"}}})
            for pixels, caption, mask in samples.each()]


# ----------------------------------------------------------------------------- evaluate.py's scores

def add_log_to_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-to", type=tracked_run, default=None, metavar="RUN_DIR",
                        help="also log the scores to the tracker run of this training run (its folder, or an export "
                             "in it), at the step of its newest export")


def tracked_run(text: str) -> Path:
    """``--log-to RUN_DIR`` (argparse type): a training run's folder (or an export folder in it) whose
    tracker record can take scores; checked before anything is computed."""
    folder = Path(text)
    if not (folder / TRACKER_RECORD).exists() and (folder.parent / TRACKER_RECORD).is_file():
        folder = folder.parent
    try:
        record = read_tracker_record(folder)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{folder / TRACKER_RECORD}: {e}") from None
    if record is None:
        raise argparse.ArgumentTypeError(f"{text}: no {TRACKER_RECORD}; not a training run that reported to a tracker "
                                         "(--report-to wandb or tensorboard)")
    if record.report_to == "mlflow":
        raise argparse.ArgumentTypeError(f"{text}: reports to mlflow, which --log-to does not support")
    if record.exported_step is None:
        raise argparse.ArgumentTypeError(f"{text}: no export noted in {TRACKER_RECORD} yet; log when it has exported")
    if record.report_to == "wandb" and not _wandb_offline() and not _wandb_api_key():
        raise argparse.ArgumentTypeError(f"{text} reports to W&B, and there is no wandb API key on this machine; run "
                                         "`wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline")
    return folder


def log_scores(run_dir: Optional[Path], scores: dict) -> None:
    """``evaluate.py fid|metrics`` scores, as ``eval/<name>``, into the tracker run of ``run_dir`` (None: nowhere)."""
    if run_dir is not None:
        _log_evaluation(run_dir, {f"eval/{k}": float(v) for k, v in scores.items() if _is_number(v)})


def log_sweep(run_dir: Optional[Path], rows: list[dict], plot: Path) -> None:
    """A sweep into the tracker run of ``run_dir`` (None: nowhere): each cell's scores as
    ``eval/<score>_steps_<n>_cfg_<w>`` (how each setting improves over training), the table and the plot."""
    if run_dir is None or not rows:
        return
    cell = ["steps", "cfg_scale", "num_samples"]
    columns = cell + [c for c in rows[0] if c not in cell and all(_is_number(r.get(c)) for r in rows)]
    scalars = {f"eval/{c}_steps_{r['steps']}_cfg_{r['cfg_scale']:g}": float(r[c])
               for r in rows for c in columns[3:]}
    _log_evaluation(run_dir, scalars, columns, [[r[c] for c in columns] for r in rows], plot)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _log_evaluation(run_dir: Path, scalars: dict[str, float], columns: Optional[list[str]] = None,
                    table: Optional[list[list]] = None, plot: Optional[Path] = None) -> None:
    """Scores are a report: whatever stops them reaching the tracker is a warning (they are printed and saved)."""
    try:
        record = read_tracker_record(run_dir)
    except ValueError as e:
        logger.warning("%s: %s; the scores were not logged to its tracker", run_dir / TRACKER_RECORD, e)
        return
    if record is None or record.exported_step is None:
        logger.warning("%s: gone or without an export; the scores were not logged to its tracker",
                       run_dir / TRACKER_RECORD)
        return
    step = record.exported_step
    image = None
    if plot is not None and plot.is_file():
        from PIL import Image
        with Image.open(plot) as opened:
            image = np.asarray(opened.convert("RGB"))
    if record.report_to == "tensorboard":
        _log_to_tensorboard(run_dir / TRACKER_LOGS / record.project, step, scalars, columns, table, image)
    elif record.report_to == "wandb":
        _log_to_wandb(run_dir, record, scalars, columns, table, image)
    else:
        logger.warning("%s now reports to %s, which --log-to does not support", run_dir, record.report_to)


def _log_to_tensorboard(folder: Path, step: int, scalars, columns, table, image) -> None:
    from torch.utils.tensorboard import SummaryWriter
    try:
        with contextlib.closing(SummaryWriter(str(folder))) as writer:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
            if table:
                writer.add_text("eval/sweep", "\n".join(markdown_table(columns, table)), step)
            if image is not None:
                writer.add_image("eval/sweep_plot", image, step, dataformats="HWC")
    except WRITE_ERRORS as e:
        logger.warning("could not write the scores to %s (%s)", folder, write_failure(e))
        return
    logger.info("logged the scores to TensorBoard %s at step %d", folder, step)


def _log_to_wandb(run_dir: Path, record: TrackerRecord, scalars, columns, table, image) -> None:
    """Into the training run's own W&B run, on an axis of their own (W&B drops a step below the run's
    newest); never beside a live training process, which is that run's one writer."""
    import wandb
    lock = durable.Lock(run_dir / LOCK_NAME)
    busy = lock.acquire()
    if busy:
        logger.warning("%s: %s; a training process may be writing to its W&B run, which takes one writer at a time, "
                       "so the scores were not logged to it: run the command again with --log-to once training stops",
                       lock.path, busy)
        return
    try:
        run = wandb.init(project=record.project, entity=record.entity, id=record.wandb_id, resume="allow",
                         dir=str(run_dir))
        try:
            run.define_metric(EVAL_STEP)
            run.define_metric("eval/*", step_metric=EVAL_STEP)
            payload = {**scalars, EVAL_STEP: record.exported_step}
            if table:
                payload["eval/sweep"] = wandb.Table(columns=columns, data=table)
            if image is not None:
                payload["eval/sweep_plot"] = wandb.Image(image)
            run.log(payload)
        finally:
            run.finish()
    except wandb.errors.Error as e:
        logger.warning("W&B could not log the scores to run %s (%s)", record.wandb_id, e)
        return
    finally:
        lock.release()
    logger.info("logged the scores to W&B run %s (project %s) at export step %d", record.wandb_id, record.project,
                record.exported_step)


def to_scalars(logs: dict[str, torch.Tensor], prefix: str = "") -> dict[str, float]:
    """Loss logs as tracker scalars: a vector ``name`` becomes ``name_0``, ``name_1``, ... (NaN entries,
    e.g. a step-size level absent from the batch, are left out). This is where logs reach the host."""
    out = {}
    for name, value in logs.items():
        value = torch.as_tensor(value).detach().float().cpu()
        if value.ndim == 0:
            out[f"{prefix}{name}"] = float(value)
        else:
            out.update({f"{prefix}{name}_{i}": float(v) for i, v in enumerate(value) if torch.isfinite(v)})
    return out


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
