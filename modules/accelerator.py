"""The Accelerator of a training run: processes, devices, mixed precision, collective timeouts."""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration

from modules.config import TrainConfig

logger = logging.getLogger("modules.accelerator")


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
