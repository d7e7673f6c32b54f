"""Stage 1: train a KL autoencoder (SD "kl-f8" recipe) on a folder of images.

    accelerate launch train_vae.py --config kl-f8 --data ./my_images --output-dir runs/vae
    python train_vae.py --config tiny --data data/shapes --output-dir runs/vae_tiny --report-to none

Reads top to bottom: setup, loop (generator and discriminator losses, one optimizer step for
both), log, checkpoint, export. The loop's mechanics are in modules/optim.py and modules/checkpoint.py.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from modules.run.accelerator import adam, make_accelerator, prepare_network
from modules.run.checkpoint import (Checkpointer, RunIdentity, StopRequest, TrainingState, checkpoint_if_due, count_step,
                               export_or_fail, saved_on_data_error)
from modules.config.cli import build_parser, resolve_run_config, run_cli
from modules.config.schema import VAERunConfig
from modules.config.io import to_dict
from modules.data.dataset import build_dataset, split_validation
from modules.errors import ConfigError
from modules.data.image_io import make_grid
from modules.core.vae_loss import VAELoss
from modules.core.metrics import psnr
from modules.run.optim import apply_update, lr_factor, set_lr
from modules.data.order import make_loader
from modules.run.output_dir import claim_output_dir, save_run_config
from modules.core.seeding import SHARED_STREAM, process_share_randn, step_generator
from modules.run.tracking import Throughput, check_tracker, init_trackers, log_image, memory_stats, to_scalars
from modules.core.networks.vae import AutoencoderKL
from modules.interop.vae import save_vae

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


def check_setup(mixed_precision: str, distributed_type: DistributedType) -> None:
    """The setups stage 1 cannot train in, refused before anything runs."""
    if mixed_precision == "fp16":
        raise ConfigError("train_vae.py does not support fp16 (its two optimizers cannot share one GradScaler): "
                          "use bf16 or no mixed precision")
    if distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        # The generator's pass through the discriminator and the adaptive GAN weight need the full,
        # unsharded weights (FSDP1 crashed there once the discriminator started, at step 50 001).
        raise ConfigError(f"train_vae.py does not support {distributed_type.value}: the autoencoder fits on one GPU "
                          "(84M parameters for kl-f8), so use DDP (accelerate_configs/multi_gpu_ddp.yaml)")


def main(argv=None) -> None:
    args = build_parser(__doc__.split("\n\n")[0]).parse_intermixed_args(argv)
    cfg = resolve_run_config(args, VAERunConfig, "vae")
    check_tracker(args.report_to)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(cfg.train, output_dir, args.report_to)
    check_setup(accelerator.mixed_precision, accelerator.distributed_type)
    with claim_output_dir(accelerator, output_dir, args.resume):
        train(cfg, args, accelerator, output_dir)
    accelerator.end_training()


def train(cfg: VAERunConfig, args, accelerator, output_dir: Path) -> None:
    device, tcfg = accelerator.device, cfg.train

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
    opt_g = adam(vae.parameters(), tcfg.lr, tcfg, device, tcfg.weight_decay, decoupled_weight_decay=False)
    opt_d = adam(loss_fn.discriminator.parameters(), cfg.loss.disc_lr, tcfg, device, 0.0, decoupled_weight_decay=False)
    vae, discriminator, opt_g, opt_d = prepare_network(accelerator, tcfg, vae, loss_fn.discriminator, opt_g, opt_d)
    loss_fn.discriminator = discriminator

    state = TrainingState()
    identity = RunIdentity("train_vae", to_dict(cfg), ("model",), data=dataset.fingerprint())
    checkpointer = Checkpointer(accelerator, output_dir, tcfg.keep_checkpoints, state, identity)
    save_run_config(accelerator, output_dir, cfg)
    checkpointer.load(args.resume)
    accelerator.step = 0  # resumes sit on an optimizer-step boundary, whatever grad_accum was

    batches = iter(make_loader(train_set, tcfg.batch_size, tcfg.seed, accelerator.process_index,
                               accelerator.num_processes, state.step * tcfg.grad_accum, cfg.data.num_workers))
    val_images = torch.stack([val_set[i]["image"] for i in range(len(val_set))]).to(device)
    init_trackers(accelerator, "ldm-vae", cfg, output_dir, args.report_to)
    throughput = Throughput(tcfg.batch_size * tcfg.grad_accum * accelerator.num_processes)
    last_layer = accelerator.unwrap_model(vae).last_layer_weight

    def export() -> None:
        export_vae(accelerator, vae, cfg, train_set, output_dir)

    if state.step >= tcfg.max_steps:
        # Resumed with no step left: killed after its last checkpoint, perhaps before the export.
        export_or_fail(export, output_dir, state.step)

    # ---- loop
    with StopRequest(accelerator) as stop, saved_on_data_error(checkpointer, state), \
            tqdm(total=tcfg.max_steps, initial=state.step, desc="vae",
                 disable=not accelerator.is_local_main_process) as progress:
        while state.step < tcfg.max_steps:
            lr = set_lr(opt_g, tcfg.lr, lr_factor(state.step, tcfg))
            set_lr(opt_d, cfg.loss.disc_lr, lr_factor(state.step, tcfg))
            vae.train()
            losses = []
            for micro in range(tcfg.grad_accum):
                batch = next(batches)
                images = batch["image"].to(device, non_blocking=True)
                if tcfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
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
                losses += [g_loss.detach(), d_loss.detach()]
            update = apply_update(accelerator, {"vae": (opt_g, vae.parameters()),
                                                "discriminator": (opt_d, discriminator.parameters())},
                                  losses, tcfg.grad_clip)

            # ---- a skipped (non-finite) step left the weights as they were: count it
            count_step(state, update.finite, tcfg, checkpointer)
            throughput.tick()
            progress.update(1)

            # ---- log
            if state.due(tcfg.log_every, tcfg.max_steps):
                scalars = to_scalars(logs)
                scalars.update(lr=lr, grad_norm=float(update.grad_norms["vae"]),
                               disc_grad_norm=float(update.grad_norms["discriminator"]),
                               images_per_s=throughput.rate(), bad_steps=state.bad_steps,
                               substituted_images=state.substituted_images,
                               skipped_images=dataset.skipped_at_scan, **memory_stats(device))
                accelerator.log(scalars, step=state.step)
                progress.set_postfix(loss=f"{scalars.get('loss_l1', 0.0):.4f}")
            if state.due(tcfg.val_every, tcfg.max_steps):
                vae.eval()
                with torch.no_grad(), accelerator.autocast():
                    recon_val, _ = vae(val_images, sample_posterior=False)
                accelerator.log({"val/psnr": psnr(recon_val.float(), val_images).mean().item()}, step=state.step)
                if state.due(tcfg.image_log_every, tcfg.max_steps):
                    log_image(accelerator, "val/input_vs_reconstruction", make_grid([val_images, recon_val]),
                              state.step, output_dir)

            # ---- checkpoint (and export, so later stages always find a model)
            if checkpoint_if_due(state, tcfg, stop, checkpointer, export, output_dir):
                break


if __name__ == "__main__":
    run_cli(main)
