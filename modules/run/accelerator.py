"""The Accelerator of a training run (processes, devices, mixed precision, collective timeouts),
and the network and optimizer set up on it with the speed and memory switches.

A network set up here may be wrapped twice: by Accelerate (DDP, FSDP) and by ``torch.compile``
(``train.compile``), whose wrapper prefixes every parameter name with ``_orig_mod.``. Whatever
reads a network's parameters by name (the EMAs, exports, checkpoints) goes through
:func:`network_of` and :func:`network_state_dict`, which give the network's own names, so a
compiled run's files load anywhere, uncompiled runs and sample.py included."""
from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration, broadcast_object_list

from modules.core.compiling import compile_backend
from modules.run.layout import TRACKER_LOGS


logger = logging.getLogger(__name__)
FUSED_ADAM_DEVICES = ("cuda", "cpu")   # devices with torch's fused Adam/AdamW kernel that runs use


def make_accelerator(cfg, output_dir: Path, report_to: str) -> Accelerator:
    """The run's Accelerator; also sets TF32 for CUDA matmuls and convolutions (``train.tf32``)."""
    mixed_precision = None if cfg.mixed_precision == "auto" else cfg.mixed_precision
    # Several processes on a machine without GPUs: accelerate only wires them up (gloo) when
    # told to use the CPU; otherwise each process silently trains alone.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_processes,
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=mixed_precision,
        log_with=None if report_to == "none" else report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / TRACKER_LOGS)),
        # A peer that dies must not leave the others blocked in a collective forever.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.process_timeout_s))],
    )
    if accelerator.is_main_process:
        logger.info("%d process(es), distributed type %s, device %s, mixed precision %s",
                    accelerator.num_processes, accelerator.distributed_type.value, accelerator.device,
                    accelerator.mixed_precision)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # We feed our own data loader, so DeepSpeed cannot infer the micro-batch size.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    return accelerator


def adam(params, lr: float, cfg, device: torch.device, weight_decay: float,
         decoupled_weight_decay: bool = True) -> torch.optim.Optimizer:
    """AdamW (or, ``decoupled_weight_decay=False``, Adam with L2 weight decay) with ``train.adam_beta*``;
    the fused kernel on CUDA and CPU (``train.fused_optimizer``): one launch per step, and a bad step
    skipped on the device (``modules.run.harness.step_unless_bad``)."""
    cls = torch.optim.AdamW if decoupled_weight_decay else torch.optim.Adam
    fused = {"fused": True} if cfg.fused_optimizer and device.type in FUSED_ADAM_DEVICES else {}
    return cls(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=weight_decay, **fused)


def prepare_network(accelerator: Accelerator, cfg, network: torch.nn.Module, *others):
    """``accelerator.prepare(network, *others)`` with the network's memory and speed switches:
    channels_last and gradient checkpointing before wrapping, torch.compile after it."""
    if cfg.gradient_checkpointing:
        network.gradient_checkpointing = True
    if cfg.channels_last:
        network.to(memory_format=torch.channels_last)
    network, *others = accelerator.prepare(network, *others)
    if cfg.compile:
        network = torch.compile(network, **compile_backend())
    return (network, *others)


def uncompiled(network: torch.nn.Module) -> torch.nn.Module:
    """``network`` without torch.compile's wrapper (what :func:`prepare_network` returned, less the compile)."""
    return getattr(network, "_orig_mod", network)


def network_of(accelerator: Accelerator, network: torch.nn.Module) -> torch.nn.Module:
    """The network itself inside what :func:`prepare_network` returned (no DDP, FSDP or compile wrapper):
    the module the EMAs mirror, whose parameter names are the network's own."""
    return accelerator.unwrap_model(network, keep_torch_compile=False)


def network_state_dict(accelerator: Accelerator, network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``accelerator.get_state_dict`` (full weights on the main process; a collective under FSDP) under the
    network's own parameter names, compiled or not."""
    return accelerator.get_state_dict(uncompiled(network))


def from_main_process(value, state):
    """``value`` of the main process, on every process of ``state`` (an Accelerator or PartialState)."""
    if state.num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def process_state() -> PartialState:
    """The processes of a script that needs no Accelerator (sampling, encoding, scoring): gloo on CPU when
    launched as several processes on a machine without CUDA."""
    return PartialState(cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)


def finish(state) -> None:
    """End a multi-process run cleanly: wait for every process, then tear the process group down
    (a process that exits with gloo still up can abort with 'terminate called')."""
    if state.num_processes > 1 and torch.distributed.is_initialized():
        state.wait_for_everyone()
        torch.distributed.destroy_process_group()
