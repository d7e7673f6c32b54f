"""Stage 1: train a KL autoencoder (SD "kl-f8" recipe) on a folder of images.

    accelerate launch train_vae.py --config kl-f8 --data ./my_images --output-dir runs/vae
    python train_vae.py --config tiny --data data/shapes --output-dir runs/vae_tiny --report-to none

Reads top to bottom: setup, loop (generator step, discriminator step), checkpoint, log,
export. The shared mechanics (checkpoints, resume, signals, schedule) are in modules/training.py.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modules.config import ConfigError, VAERunConfig, to_dict
from modules.data import build_dataset, make_loader, split_validation
from modules.losses import VAELoss
from modules.metrics import psnr
from modules.training import (SHARED_STREAM, Checkpointer, StopRequest, Throughput, TrainingState, build_parser,
                              checkpoint_if_due, clipped_grad_norm, count_step, export_or_fail, init_trackers,
                              log_image, lr_factor, make_accelerator, make_grid, memory_stats, prepare_output_dir,
                              process_share_randn, resolve_run_config, run_cli, set_lr, step_generator)
from modules.vae import AutoencoderKL, save_vae

logger = logging.getLogger("train_vae")


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, dataset, num_images: int, batch_size: int,
                         device: torch.device) -> float:
    """1 / std of posterior samples over training images (LDM's scale_by_std)."""
    latents = []
    generator = torch.Generator(device=device).manual_seed(0)
    indices = list(range(min(num_images, len(dataset))))
    for start in range(0, len(indices), batch_size):
        images = torch.stack([dataset[i]["image"] for i in indices[start:start + batch_size]]).to(device)
        latents.append(vae.encode(images).sample(generator).float().cpu())
    return 1.0 / torch.cat(latents).std().item()


def latent_shape(images: torch.Tensor, cfg: VAERunConfig) -> tuple[int, ...]:
    f = cfg.model.downsample_factor
    return (images.shape[0], cfg.model.latent_channels, images.shape[2] // f, images.shape[3] // f)


def export_vae(accelerator, vae, cfg: VAERunConfig, train_set, output_dir: Path) -> None:
    """Write ``output_dir/vae`` (config + safetensors) with the measured latent scale factor."""
    state_dict = accelerator.get_state_dict(vae)  # collective: full weights on the main process
    if not accelerator.is_main_process:
        return
    export_model = AutoencoderKL(copy.deepcopy(cfg.model)).to(accelerator.device).eval()
    export_model.load_state_dict(state_dict)
    export_model.config.scale_factor = measure_latent_scale(
        export_model, train_set, cfg.scale_samples, cfg.train.batch_size, accelerator.device)
    save_vae(export_model, output_dir / "vae", run_config=to_dict(cfg))
    logger.info("exported %s (latent scale factor %.5f)", output_dir / "vae", export_model.config.scale_factor)


def main(argv=None) -> None:
    args = build_parser(__doc__.split("\n\n")[0]).parse_intermixed_args(argv)
    cfg = resolve_run_config(args, VAERunConfig, "vae")
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(cfg.train, output_dir, args.report_to)
    device, tcfg = accelerator.device, cfg.train
    if accelerator.mixed_precision == "fp16" or accelerator.distributed_type.value == "DEEPSPEED":
        # Two optimizers cannot share one GradScaler, and DeepSpeed drives a single model.
        raise ConfigError(f"train_vae.py does not support {accelerator.mixed_precision} / "
                          f"{accelerator.distributed_type.value}: use bf16 or no mixed precision, with DDP or FSDP")

    # ---- data: errors here (missing dir, no images, missing masks) come before any training
    dataset = build_dataset(cfg.data)
    train_set, val_set = split_validation(dataset, cfg.data.num_val_images)
    if dataset.skipped_at_scan:
        logger.warning("skipped %d unreadable image files (first: %s)", dataset.skipped_at_scan,
                       dataset.skipped_files[0])

    # ---- models and optimizers: the generator optimizer holds only the autoencoder
    torch.manual_seed(tcfg.seed)
    vae = AutoencoderKL(cfg.model)
    loss_fn = VAELoss(cfg.loss).to(device)
    opt_g = torch.optim.Adam(vae.parameters(), lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                             weight_decay=tcfg.weight_decay)
    opt_d = torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.loss.disc_lr,
                             betas=(tcfg.adam_beta1, tcfg.adam_beta2))
    vae, discriminator, opt_g, opt_d = accelerator.prepare(vae, loss_fn.discriminator, opt_g, opt_d)
    loss_fn.discriminator = discriminator

    state = TrainingState()
    checkpointer = Checkpointer(accelerator, output_dir, tcfg.keep_checkpoints, state)
    prepare_output_dir(accelerator, output_dir, cfg, args.resume, model_sections=("model",))
    checkpointer.load(args.resume)
    accelerator.step = 0  # resumes sit on an optimizer-step boundary, whatever grad_accum was

    loader = make_loader(train_set, tcfg.batch_size, tcfg.seed, accelerator.process_index,
                         accelerator.num_processes, state.step * tcfg.grad_accum, cfg.data.num_workers)
    batches = iter(loader)
    val_images = torch.stack([val_set[i]["image"] for i in range(len(val_set))]).to(device)
    init_trackers(accelerator, "ldm-vae", cfg, output_dir, args.report_to)
    throughput = Throughput(tcfg.batch_size * tcfg.grad_accum * accelerator.num_processes)
    last_layer = accelerator.unwrap_model(vae).last_layer_weight
    progress = tqdm(total=tcfg.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                    desc="vae")

    def export() -> None:
        export_vae(accelerator, vae, cfg, train_set, output_dir)

    if state.step >= tcfg.max_steps:
        # Resumed with no step left: killed after its last checkpoint, perhaps before the export.
        export_or_fail(export, output_dir, state.step)

    # ---- loop
    with StopRequest(accelerator) as stop:  # SIGTERM/SIGINT: checkpoint, then exit 0
        while state.step < tcfg.max_steps:
            lr = set_lr(opt_g, tcfg.lr, lr_factor(state.step, tcfg))
            set_lr(opt_d, cfg.loss.disc_lr, lr_factor(state.step, tcfg))
            vae.train()
            for micro in range(tcfg.grad_accum):
                batch = next(batches)
                images = batch["image"].to(device, non_blocking=True)
                state.substituted_images += int(batch["substituted"].sum())
                shared = step_generator(tcfg.seed, state.step, micro, SHARED_STREAM, device)
                noise = process_share_randn(latent_shape(images, cfg), shared, accelerator.process_index,
                                            accelerator.num_processes)
                with accelerator.accumulate(vae, discriminator):
                    with accelerator.autocast():
                        reconstructions, posterior = vae(images, noise=noise)
                        g_loss, logs = loss_fn.generator_loss(images, reconstructions, posterior, last_layer,
                                                              state.step)
                    accelerator.backward(g_loss)
                    with accelerator.autocast():
                        d_loss, d_logs = loss_fn.discriminator_loss(images, reconstructions.detach(), state.step)
                    accelerator.backward(d_loss)
                    logs.update(d_logs)
                    if accelerator.sync_gradients:
                        g_norm = clipped_grad_norm(accelerator, vae.parameters(), tcfg.grad_clip)
                        d_norm = clipped_grad_norm(accelerator, discriminator.parameters(), tcfg.grad_clip)
                        finite = bool(torch.isfinite(g_norm) and torch.isfinite(d_norm) and torch.isfinite(g_loss))
                        if finite:
                            opt_g.step()
                            opt_d.step()
                    opt_g.zero_grad(set_to_none=True)
                    opt_d.zero_grad(set_to_none=True)

            # ---- a non-finite step skipped its update: the weights are still the last good ones
            count_step(state, finite, tcfg.max_bad_steps, checkpointer)
            throughput.tick()
            progress.update(1)

            # ---- log
            if state.step % tcfg.log_every == 0 or state.step == tcfg.max_steps:
                scalars = {k: float(v) for k, v in logs.items()}
                scalars.update(lr=lr, grad_norm=float(g_norm), disc_grad_norm=float(d_norm),
                               images_per_s=throughput.rate(), bad_steps=state.bad_steps,
                               substituted_images=state.substituted_images,
                               skipped_images=dataset.skipped_at_scan, **memory_stats(device))
                accelerator.log(scalars, step=state.step)
                progress.set_postfix(loss=f"{scalars.get('loss_l1', 0.0):.4f}")
            if state.step % tcfg.val_every == 0 or state.step == tcfg.max_steps:
                vae.eval()
                with torch.no_grad(), accelerator.autocast():
                    recon_val, _ = vae(val_images, sample_posterior=False)
                accelerator.log({"val/psnr": psnr(recon_val.float(), val_images).mean().item()}, step=state.step)
                if state.step % tcfg.image_log_every == 0 or state.step == tcfg.max_steps:
                    log_image(accelerator, "val/input_vs_reconstruction", make_grid([val_images, recon_val]),
                              state.step, output_dir)

            # ---- checkpoint (and export, so later stages always find a model)
            if checkpoint_if_due(state, tcfg, stop, checkpointer, export, output_dir):
                break

    progress.close()
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
