"""Stage 2: train a UNet in a VAE's latent space (shortcut, flow or DDPM objective).

    accelerate launch train_unet.py --config seed --data ./my_images --vae runs/vae \
        --output-dir runs/unet objective=shortcut cond.type=class
    python train_unet.py --config tiny --data data/shapes --vae runs/vae_tiny --output-dir runs/unet_tiny --report-to none

Reads top to bottom: setup (frozen VAE, latent cache, UNet, two EMAs), loop, log (sample
grids from the EMA weights), checkpoint, export. Mechanics shared with stage 1 are in
modules/training.py; the loss is in modules/objectives.py, the samplers in modules/samplers.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from modules.config import ConfigError, UNetRunConfig, to_dict
from modules.data import build_dataset, make_loader
from modules.ema import EMA
from modules.export import find_model_folder, save_model_folder
from modules.generation import (GenerationSpec, batch_condition, decode_latents, generate_latents,
                               grid_conditions)
from modules.latent_cache import build_or_load
from modules.objectives import build_objective
from modules.training import (SHARED_STREAM, Checkpointer, StopRequest, Throughput, TrainingState, build_parser,
                              checkpoint_if_due, clipped_grad_norm, count_step, export_or_fail, init_trackers,
                              log_image, lr_factor, make_accelerator, make_grid, memory_stats, prepare_output_dir,
                              process_share_randn, resolve_run_config, run_cli, set_lr, step_generator)
from modules.unet import UNet
from modules.vae import load_vae

logger = logging.getLogger("train_unet")


def derive_fields(cfg: UNetRunConfig, vae, dataset, objective) -> None:
    """Fill the config fields that follow from the VAE, the data and the objective."""
    cfg.model.in_channels = vae.config.latent_channels
    cfg.model.num_step_levels = objective.num_step_levels
    cfg.cond.image_downsample = vae.config.downsample_factor
    if cfg.cond.type == "class":
        if dataset.num_classes < 2:
            raise ConfigError(f"cond.type=class needs class sub-folders (or a label column) in {cfg.data.path}; "
                              f"found {dataset.num_classes} class(es)")
        cfg.cond.num_classes = dataset.num_classes


def ema_files(path: Path, rank: int) -> Path:
    return path / f"ema_rank{rank}.safetensors"


def check_replicas_agree(accelerator, ema: EMA) -> None:
    """Replicated (non-sharded) EMAs must be bit-identical on every process; say so, or fail loudly."""
    checksum = torch.stack([v.double().sum() for v in ema.state_dict().values()]).sum().reshape(1)
    sums = accelerator.gather(checksum.to(accelerator.device))
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"EMA weights differ between processes (checksums {sums.tolist()})")
    if accelerator.is_main_process:
        logger.info("EMA weights identical on all %d processes", accelerator.num_processes)


def export_unet(accelerator, unet, ema: EMA, cfg: UNetRunConfig, vae_folder: Path, vae_config,
                output_dir: Path) -> None:
    """Write ``unet`` (online weights) and ``unet_ema`` (sampling EMA) model folders."""
    owner = accelerator.unwrap_model(unet)
    online = accelerator.get_state_dict(unet)
    with ema.swapped(owner):
        # get_state_dict may return views of the live parameters: copy before they are swapped back.
        averaged = {k: v.clone() for k, v in accelerator.get_state_dict(unet).items()}
    if not accelerator.is_main_process:
        return
    config = {"kind": "unet", "model": to_dict(cfg.model), "cond": to_dict(cfg.cond),
              "objective": cfg.objective, "shortcut": to_dict(cfg.shortcut), "ddpm": to_dict(cfg.ddpm),
              "latent_size": cfg.data.image_size // cfg.cond.image_downsample,
              "vae": {"path": str(vae_folder.resolve()), "model": to_dict(vae_config)},
              "run_config": to_dict(cfg)}
    save_model_folder(output_dir / "unet", online, config)
    save_model_folder(output_dir / "unet_ema", averaged, {**config, "ema_decay": cfg.ema.decay})


def main(argv=None) -> None:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="exported VAE folder or a train_vae.py output dir")
    args = parser.parse_intermixed_args(argv)
    if args.vae is not None:
        args.overrides.append(f"vae={args.vae}")
    cfg = resolve_run_config(args, UNetRunConfig, "unet")
    if not cfg.vae:
        raise ConfigError("no VAE given: pass --vae PATH (an exported VAE folder or a train_vae.py output dir)")
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(cfg.train, output_dir, args.report_to)
    device, tcfg = accelerator.device, cfg.train

    # ---- frozen VAE, data, latent cache
    vae_folder = find_model_folder(cfg.vae, "vae")
    vae = load_vae(vae_folder).to(device).eval().requires_grad_(False)
    scale = vae.config.scale_factor
    cfg.data.masks = cfg.cond.type == "mask"
    dataset = build_dataset(cfg.data)
    if cfg.data.vflip or cfg.data.rot90 or cfg.data.random_crop_scale < 1:
        logger.warning("stage 2 trains on cached latents of centre crops and their horizontal flips: "
                       "data.vflip, data.rot90 and data.random_crop_scale are ignored")
    objective = build_objective(cfg)
    derive_fields(cfg, vae, dataset, objective)
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else output_dir.parent / "latent_cache"
    latents = build_or_load(accelerator, vae, vae_folder, dataset, cfg.data, cache_root, tcfg.batch_size)

    # ---- network, optimizer, the two EMAs (slow: sampling/export; fast: shortcut teacher)
    torch.manual_seed(tcfg.seed)
    unet = UNet(cfg.model, cfg.cond)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  weight_decay=tcfg.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    owner = accelerator.unwrap_model(unet)  # holds the (possibly sharded) parameters the EMAs mirror
    ema = EMA(owner, cfg.ema.decay, cfg.ema.warmup)
    use_teacher_ema = cfg.objective == "shortcut" and cfg.shortcut.teacher_ema_decay > 0
    teacher_ema = EMA(owner, cfg.shortcut.teacher_ema_decay, warmup=False) if use_teacher_ema else None

    # ---- checkpoints carry both EMAs (per process, so FSDP shards stay with their owner)
    rank = accelerator.process_index
    per_rank_ema = accelerator.distributed_type.value == "FSDP"

    def save_emas(path: Path) -> None:
        if not per_rank_ema and accelerator.num_processes > 1:
            check_replicas_agree(accelerator, ema)
        if per_rank_ema or accelerator.is_main_process:
            tensors = {f"sample.{k}": v for k, v in ema.state_dict().items()}
            if teacher_ema is not None:
                tensors.update({f"teacher.{k}": v for k, v in teacher_ema.state_dict().items()})
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, ema_files(path, rank))

    def load_emas(path: Path) -> None:
        tensors = load_file(ema_files(path, rank if per_rank_ema else 0), device=str(device))
        ema.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("sample.")})
        if teacher_ema is not None:
            teacher_ema.load_state_dict({k[8:]: v for k, v in tensors.items() if k.startswith("teacher.")})

    state = TrainingState()
    checkpointer = Checkpointer(accelerator, output_dir, tcfg.keep_checkpoints, state, save_emas, load_emas)
    prepare_output_dir(accelerator, output_dir, cfg, args.resume,
                       model_sections=("model", "cond", "objective", "shortcut.denoise_timesteps"))
    checkpointer.load(args.resume)
    accelerator.step = 0  # resumes sit on an optimizer-step boundary, whatever grad_accum was

    loader = make_loader(latents, tcfg.batch_size, tcfg.seed, rank, accelerator.num_processes,
                         state.step * tcfg.grad_accum, cfg.data.num_workers)
    batches = iter(loader)
    spec = GenerationSpec.from_run_config(cfg)
    grid_cond = grid_conditions(spec, latents, cfg.sample.num_images)
    grid_cond = None if grid_cond is None else grid_cond.to(device)
    init_trackers(accelerator, "ldm-unet", cfg, output_dir, args.report_to)
    throughput = Throughput(tcfg.batch_size * tcfg.grad_accum * accelerator.num_processes)
    progress = tqdm(total=tcfg.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc=f"unet/{cfg.objective}")

    def level_offset(step: int, micro: int) -> int:
        """Rotates the shortcut levels of small bootstrap batches across micro-batches and processes."""
        return (step * tcfg.grad_accum + micro) * accelerator.num_processes + rank

    def export() -> None:
        export_unet(accelerator, unet, ema, cfg, vae_folder, vae.config, output_dir)

    if state.step >= tcfg.max_steps:
        # Resumed with no step left: killed after its last checkpoint, perhaps before the export.
        export_or_fail(export, output_dir, state.step)

    # ---- loop
    with StopRequest(accelerator) as stop:  # SIGTERM/SIGINT: checkpoint, then exit 0
        while state.step < tcfg.max_steps:
            lr = set_lr(optimizer, tcfg.lr, lr_factor(state.step, tcfg))
            unet.train()
            for micro in range(tcfg.grad_accum):
                batch = next(batches)
                shared = step_generator(tcfg.seed, state.step, micro, SHARED_STREAM, device)
                generator = step_generator(tcfg.seed, state.step, micro, rank, device)
                mean, std = batch["mean"].to(device), batch["std"].to(device)
                x1 = (mean + std * process_share_randn(mean.shape, shared, rank, accelerator.num_processes)) * scale
                cond = batch_condition(batch, cfg.cond.type, device)
                with accelerator.accumulate(unet), accelerator.autocast():
                    if teacher_ema is not None:
                        # Targets from the fast EMA (weights swapped in), then one forward with gradient.
                        with teacher_ema.swapped(owner):
                            targets = objective.targets(unet, x1, cond, generator,
                                                        step=level_offset(state.step, micro))
                        loss, logs = objective.loss_from_targets(unet, targets, cond)
                    else:
                        loss, logs = objective.loss(unet, x1, cond, generator=generator)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = clipped_grad_norm(accelerator, unet.parameters(), tcfg.grad_clip)
                        if accelerator.scaler is not None:
                            # fp16: the GradScaler skips non-finite steps itself and must see every step.
                            optimizer.step()
                            finite = not optimizer.step_was_skipped
                        else:
                            finite = bool(torch.isfinite(grad_norm) and torch.isfinite(loss))
                            if finite:
                                optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

            # ---- EMAs follow good steps only; non-finite steps are skipped and counted
            if finite:
                ema.update(owner)
                if teacher_ema is not None:
                    teacher_ema.update(owner)
            count_step(state, finite, tcfg.max_bad_steps, checkpointer)
            throughput.tick()
            progress.update(1)

            # ---- log: scalars, and sample grids from the slow EMA at several step counts
            if state.step % tcfg.log_every == 0 or state.step == tcfg.max_steps:
                scalars = {k: float(v) for k, v in logs.items()}
                scalars.update(loss=loss.item(), lr=lr, grad_norm=grad_norm.item(), images_per_s=throughput.rate(),
                               bad_steps=state.bad_steps, **memory_stats(device))
                accelerator.log(scalars, step=state.step)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}")
            if state.step % tcfg.image_log_every == 0 or state.step == tcfg.max_steps:
                unet.eval()
                rows = []
                with ema.swapped(owner):
                    for steps in cfg.sample.steps:
                        if cfg.objective == "shortcut" and steps > cfg.shortcut.denoise_timesteps:
                            continue
                        z = generate_latents(unet, spec, grid_cond, range(cfg.sample.num_images), steps,
                                             cfg_scale=cfg.sample.cfg_scale, device=device)
                        rows.append(decode_latents(vae, z, scale, batch_size=tcfg.batch_size))
                log_image(accelerator, "samples/rows_" + "_".join(str(s) for s in cfg.sample.steps) + "_steps",
                          make_grid(rows), state.step, output_dir)

            # ---- checkpoint and export
            if checkpoint_if_due(state, tcfg, stop, checkpointer, export, output_dir):
                break

    progress.close()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
