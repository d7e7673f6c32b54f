"""Stage 1: train a KL autoencoder (SD "kl-f8" recipe) on a folder of images.

    accelerate launch train_vae.py --config kl-f8 --data ./my_images --output-dir runs/vae
    python train_vae.py --config tiny --data data/shapes --output-dir runs/vae_tiny --report-to none

Reads top to bottom: setup, loop (generator and discriminator losses, one optimizer step for
both), log, checkpoint, export. The losses are in modules/core/vae_loss.py, what a run must
survive in modules/run/harness.py.
"""
from __future__ import annotations

import copy
import logging

import torch
from accelerate.utils import DistributedType

from modules.config.cli import build_parser, resolve_run_config, run_cli
from modules.config.io import to_dict
from modules.config.schema import VAERunConfig
from modules.core.metrics import psnr
from modules.core.networks.vae import AutoencoderKL
from modules.core.seeding import SHARED_STREAM, process_share_randn, step_generator
from modules.core.vae_loss import VAELoss
from modules.data.dataset import build_dataset, split_validation
from modules.data.image_io import make_grid
from modules.data.order import make_loader
from modules.errors import ConfigError
from modules.interop.lpips import perceptual_network
from modules.run.accelerator import adam
from modules.run.checkpoint import RunIdentity
from modules.run.export import save_vae
from modules.run.harness import Run, lr_factor, set_lr
from modules.run.tracking import check_tracker, to_scalars

logger = logging.getLogger("train_vae")


@torch.no_grad()
def measure_latent_scale(vae: AutoencoderKL, dataset, num_images: int, batch_size: int,
                         device: torch.device) -> float:
    """1 / std of posterior samples over training images (LDM's scale_by_std), after the VAE's shift or
    per-channel statistics when its config gives them (``vae.config.scale_factor`` is 1 here)."""
    latents = []
    generator = torch.Generator(device=device).manual_seed(0)
    indices = list(range(min(num_images, len(dataset))))
    for start in range(0, len(indices), batch_size):
        images = torch.stack([dataset[i]["image"] for i in indices[start:start + batch_size]]).to(device)
        latents.append(vae.normalize(vae.encode(images).sample(generator)).float().cpu())
    return 1.0 / torch.cat(latents).std().item()


def latent_shape(images: torch.Tensor, cfg: VAERunConfig) -> tuple[int, ...]:
    f = cfg.model.downsample_factor
    return (images.shape[0], cfg.model.latent_channels, images.shape[2] // f, images.shape[3] // f)


def export_vae(run: Run, vae, cfg: VAERunConfig, train_set) -> None:
    """Write ``OUTPUT_DIR/vae`` (config + safetensors) with the measured latent scale factor."""
    accelerator = run.accelerator
    state_dict = run.state_dict(vae)  # collective: full weights on the main process, under their own names
    if not run.is_main:
        return
    export_model = AutoencoderKL(copy.deepcopy(cfg.model)).to(accelerator.device).eval()
    export_model.load_state_dict(state_dict)
    export_model.config.scale_factor = 1.0
    export_model.config.scale_factor = measure_latent_scale(
        export_model, train_set, cfg.scale_samples, cfg.train.batch_size, accelerator.device)
    save_vae(export_model, run.output_dir / "vae", run_config=to_dict(cfg))
    logger.info("exported %s (latent scale factor %.5f)", run.output_dir / "vae", export_model.config.scale_factor)


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
    check_tracker(args)
    with Run("train_vae", cfg, args) as run:
        check_setup(run.accelerator.mixed_precision, run.accelerator.distributed_type)
        train(cfg, run)


def train(cfg: VAERunConfig, run: Run) -> None:
    tcfg, device = cfg.train, run.device

    # ---- data: errors here (missing dir, no images, missing masks) come before any training
    dataset = build_dataset(cfg.data)
    train_set, val_set = split_validation(dataset, cfg.data.num_val_images)
    if dataset.skipped_at_scan:
        logger.warning("skipped %d unreadable image files (first: %s)", dataset.skipped_at_scan,
                       dataset.skipped_files[0])

    # ---- models and optimizers: the generator optimizer holds only the autoencoder
    torch.manual_seed(tcfg.seed)
    vae = AutoencoderKL(cfg.model)
    loss_fn = VAELoss(cfg.loss, perceptual=perceptual_network(cfg.loss)).to(device)
    opt_g = adam(vae.parameters(), tcfg.lr, tcfg, device, tcfg.weight_decay, decoupled_weight_decay=False)
    opt_d = adam(loss_fn.discriminator.parameters(), cfg.loss.disc_lr, tcfg, device, 0.0, decoupled_weight_decay=False)
    vae, discriminator, opt_g, opt_d = run.prepare(vae, loss_fn.discriminator, opt_g, opt_d)
    loss_fn.discriminator = discriminator

    run.start(RunIdentity("train_vae", cfg, ("model",), data=dataset.fingerprint()))
    batches = iter(make_loader(train_set, tcfg.batch_size, tcfg.seed, run.rank, run.world,
                               run.state.step * tcfg.grad_accum, cfg.data.num_workers))
    # data.num_val_images=0: no hold-out, so no validation PSNR or reconstruction grids
    val_images = torch.stack([val_set[i]["image"] for i in range(len(val_set))]).to(device) if len(val_set) else None
    if val_images is None and run.is_main:
        logger.info("data.num_val_images=0: no validation PSNR or reconstruction grids; every image trains")
    last_layer = run.network(vae).last_layer_weight

    if run.finished:    # resumed with no step left: killed after its last checkpoint, perhaps before the export
        with run.exporting():
            export_vae(run, vae, cfg, train_set)

    # ---- loop
    for step in run.steps():
        lr = set_lr(opt_g, tcfg.lr, lr_factor(step, tcfg))
        set_lr(opt_d, cfg.loss.disc_lr, lr_factor(step, tcfg))
        vae.train()
        losses = []
        for micro in range(tcfg.grad_accum):
            batch = next(batches)
            images = batch["image"].to(device, non_blocking=True)
            if tcfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            run.state.substituted_images += int(batch["substituted"].sum())
            shared = step_generator(tcfg.seed, step, micro, SHARED_STREAM, device)
            noise = process_share_randn(latent_shape(images, cfg), shared, run.rank, run.world)
            with run.accelerator.accumulate(vae, discriminator):
                with run.accelerator.autocast():
                    reconstructions, posterior = vae(images, noise=noise)
                    g_loss, logs = loss_fn.generator_loss(images, reconstructions, posterior, last_layer, step)
                run.accelerator.backward(g_loss)
                with run.accelerator.autocast():
                    d_loss, d_logs = loss_fn.discriminator_loss(images, reconstructions.detach(), step)
                run.accelerator.backward(d_loss)
            logs.update(d_logs)
            losses += [g_loss.detach(), d_loss.detach()]
        update = run.update({"vae": (opt_g, vae.parameters()), "discriminator": (opt_d, discriminator.parameters())},
                            losses)

        # ---- log
        if run.every(tcfg.log_every):
            run.log({**to_scalars(logs), "lr": lr, "grad_norm": float(update.grad_norms["vae"]),
                     "disc_grad_norm": float(update.grad_norms["discriminator"]),
                     "substituted_images": run.state.substituted_images, "skipped_images": dataset.skipped_at_scan},
                    shown="loss_l1")
        if val_images is not None and run.every(tcfg.val_every):
            vae.eval()
            with torch.no_grad(), run.accelerator.autocast():
                recon_val, _ = vae(val_images, sample_posterior=False)
            run.accelerator.log({"val/psnr": psnr(recon_val.float(), val_images).mean().item()}, step=run.state.step)
            if run.every(tcfg.image_log_every):
                run.log_image("val/input_vs_reconstruction", make_grid([val_images, recon_val]))

        # ---- checkpoint (and export, so later stages always find a model)
        if run.checkpoint_due():
            run.save_checkpoint()
            with run.exporting():
                export_vae(run, vae, cfg, train_set)


if __name__ == "__main__":
    run_cli(main)
