"""What a run reports: tracker setup (wandb, tensorboard, mlflow), image grids, throughput, memory.

Reports are never state: an image that cannot be written (a full disk) is a warning, and the
run goes on to its next checkpoint, which fails cleanly if the disk is still full.
"""
from __future__ import annotations

import importlib.util
import logging
import netrc
import os
import time
import urllib.parse
from pathlib import Path

import torch
from accelerate import Accelerator

from modules.config.io import to_dict
from modules.data.image_io import save_png, to_uint8
from modules.durable import WRITE_ERRORS, write_failure
from modules.errors import ConfigError

logger = logging.getLogger(__name__)


def check_tracker(report_to: str) -> None:
    """Refuse, before anything runs, a tracker that would fail after setup."""
    if report_to in ("tensorboard", "mlflow") and importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"--report-to {report_to}: the {report_to} package is not installed "
                          f"(pip install {report_to}, or choose --report-to wandb or none)")
    if report_to == "wandb" and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun") \
            and not _wandb_api_key():
        raise ConfigError("--report-to wandb: no wandb API key on this machine; run `wandb login` (or set "
                          "WANDB_API_KEY), or set WANDB_MODE=offline to log locally, or pass --report-to none")


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


def log_image(accelerator: Accelerator, name: str, grid: torch.Tensor, step: int, output_dir: Path) -> None:
    """Log an image grid ([3,H,W] in [-1,1]) to the trackers and save it as a PNG in the run."""
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
            tracker.log({name: wandb.Image(array)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image(name, array, step, dataformats="HWC")
        elif tracker.name == "mlflow":
            import mlflow
            mlflow.log_image(array, file_name)


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
