"""Stage 2: train a UNet or a DiT in a VAE's latent space (shortcut, flow, MeanFlow or DDPM objective).

    accelerate launch train_unet.py --config seed --data ./my_images --vae runs/vae \
        --output-dir runs/unet objective=shortcut cond.type=class
    python train_unet.py --config tiny --data data/shapes --vae runs/vae_tiny --output-dir runs/unet_tiny --report-to none

Reads top to bottom: setup (the frozen VAE and text encoder, the data, the sizes they give the
network, the network, the latent store, the two EMAs), the loop (the objective's loss, one
optimizer step, the EMAs), logging (sample grids from the EMA weights, scores), checkpoint and
export. The objectives are in modules/core/objectives/, the networks in modules/core/networks/,
what a run must survive in modules/run/harness.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate.utils import DistributedType

from modules.config.cli import build_parser, resolve_run_config, run_cli
from modules.config.io import to_dict
from modules.config.schema import UNetRunConfig, network_sizes
from modules.core.ema import EMA, teacher
from modules.core.generation import GenerationSpec, batch_condition, conditions, decode_latents, generate_latents
from modules.core.networks import build_network
from modules.core.objectives.base import Draws, randn_like
from modules.core.ot_pairing import PairedPool
from modules.core.seeding import SHARED_STREAM, paired_noise_generator, process_share_randn, step_generator
from modules.data.dataset import build_dataset
from modules.data import latent_store
from modules.data.order import make_loader
from modules.durable import write_or_fail
from modules.errors import ConfigError
from modules.eval.training import TrainingEvaluator, prepare_fid
from modules.interop.clip import TextEncoder
from modules.interop.dit import diffusers_dit_writer, load_init_weights
from modules.interop.vae import load_vae
from modules.run.accelerator import adam
from modules.run.checkpoint import RunIdentity
from modules.run.export import (find_model_folder, latent_norm_record, save_network, save_vae, vae_identity,
                                vae_to_resume_with, with_latent_norm)
from modules.run.harness import Run, lr_factor, set_lr
from modules.run.layout import FROZEN_VAE
from modules.run.posthoc import SnapshotTracker
from modules.run.tracking import SampleGrid, check_tracker, condition_captions, to_scalars

logger = logging.getLogger("train_unet")
MODEL_SECTIONS = ("model", "cond", "objective", "shortcut.denoise_timesteps",   # what a resume may not change
                  "ema.posthoc", "ema.posthoc_sigma_rels", "latent_norm")


def export_networks(run: Run, net, ema: EMA, cfg: UNetRunConfig, sizes, vae_record: dict, text_record=None) -> None:
    """Write ``unet/`` (online weights) and ``unet_ema/`` (the sampling EMA) model folders, whatever the network."""
    online = run.state_dict(net)     # the network's own names, compiled or not
    with ema.swapped(run.network(net)):
        # get_state_dict may return views of the live parameters: copy before they are swapped back.
        averaged = {k: v.clone() for k, v in run.state_dict(net).items()}
    if run.is_main:
        for folder, weights, state_dict in (("unet", "online", online), ("unet_ema", "ema", averaged)):
            save_network(run.output_dir / folder, state_dict, cfg, sizes, vae_record, weights, text_record,
                         diffusers=diffusers_dit_writer(cfg, sizes))


def main(argv=None) -> None:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="exported VAE folder or a train_vae.py output dir")
    args = parser.parse_intermixed_args(argv)
    if args.vae is not None:
        args.overrides.append(f"vae={args.vae}")
    cfg = resolve_run_config(args, UNetRunConfig, "unet")
    if not cfg.vae:
        raise ConfigError("no VAE given: pass --vae PATH (an exported VAE folder or a train_vae.py output dir)")
    check_tracker(args)
    with Run("train_unet", cfg, args) as run:
        train(cfg, run)


def train(cfg: UNetRunConfig, run: Run) -> None:
    tcfg, device = cfg.train, run.device

    # ---- the frozen VAE and text encoder, the data, and the sizes they give the network
    vae_folder = find_model_folder(vae_to_resume_with(cfg.vae, run.output_dir, run.args.resume), "vae")
    vae = load_vae(vae_folder).to(device).eval().requires_grad_(False)
    vae_id = vae_identity(vae)
    frozen_vae = run.output_dir / FROZEN_VAE     # this run's copy: its exports stay usable if the VAE trains on
    vae_record = {"path": str(vae_folder.resolve()), "copy": str(frozen_vae.resolve()), "identity": vae_id,
                  "model": to_dict(vae.config)}
    # Text: the encoder's files are hashed and its tokenizer read now; its weights only if captions need encoding.
    text_encoder = TextEncoder(cfg.cond.text_encoder, cfg.cond.text_layer, device) if cfg.cond.type == "text" else None
    # The data: a latent store given as --data (encode.py), or the images, whose own store is encoded once below.
    wanted = latent_store.StoreSpec(vae=vae_id, source="", image_size=cfg.data.image_size, hflip=cfg.data.hflip,
                                    masks=cfg.cond.type == "mask", num_rows=0,
                                    text=latent_store.text_key(text_encoder))
    dataset = None
    if latent_store.is_store(cfg.data.path):
        latents = latent_store.open_store(Path(cfg.data.path), wanted)
        num_classes = latents.num_classes
    else:
        captions = (cfg.cond.caption_column, cfg.cond.allow_empty_caption) if text_encoder is not None else ()
        dataset = build_dataset(cfg.data, *captions, masks=cfg.cond.type == "mask")
        num_classes = dataset.num_classes
    if cfg.data.vflip or cfg.data.rot90 or cfg.data.random_crop_scale < 1:
        logger.warning("stage 2 trains on the latents of centre crops and their horizontal flips: "
                       "data.vflip, data.rot90 and data.random_crop_scale are ignored")
    text_sizes = (text_encoder.tokens, text_encoder.width) if text_encoder is not None else ()
    sizes = network_sizes(cfg, vae.config, num_classes, *text_sizes)

    # ---- the network and the FID reference, before the latents: what does not fit stops the run at once
    torch.manual_seed(tcfg.seed)
    net = build_network(cfg.model, cfg.cond, sizes)
    if cfg.init_from:   # a resumed run's checkpoint then replaces these weights
        load_init_weights(net, cfg, sizes)
    fid = prepare_fid(cfg, run.accelerator)

    # ---- the latents (the images' store: encoded by every process the first time, then opened), evaluation
    if dataset is not None:
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else run.output_dir.parent / "latent_cache"
        spec = latent_store.spec_of(dataset, vae_id, cfg.data.image_size, cfg.data.hflip, wanted.masks, text_encoder)
        latents = latent_store.open_or_encode(vae, dataset, spec, cache_root, tcfg.batch_size, device, run.rank,
                                              run.world, text_encoder, cfg.data.num_workers)
    if text_encoder is not None:    # the null condition: the empty prompt's embedding, kept with the weights
        net.conditioner.null_text.copy_(latents.null_text)
        truncated = latents.truncated_captions()
        if truncated and run.is_main:
            logger.warning("%d caption(s) of the data are longer than the text encoder's %d tokens: truncated (as "
                           "Stable Diffusion does)", truncated, text_encoder.tokens)
    train_latents, val_latents = latents.split(cfg.eval.val_images) if cfg.eval.val_images else (latents, None)
    # The store holds raw posteriors; latent_norm=channel normalises them per channel (recorded with the exports).
    latent_norm = latent_norm_record(cfg.latent_norm, vae, train_latents)
    if latent_norm:
        vae_record["latent_norm"] = latent_norm
    source_vae, vae = vae, with_latent_norm(vae, latent_norm, frozen_vae)
    spec = GenerationSpec.of(cfg, sizes)
    evaluator = TrainingEvaluator(cfg, run.accelerator, spec, latents, vae.normalize, val_latents, fid)

    # ---- optimizer, the two EMAs (slow: sampling/export; fast: the objective's teacher, when it has one)
    optimizer = adam(net.parameters(), tcfg.lr, tcfg, device, tcfg.weight_decay)
    net, optimizer = run.prepare(net, optimizer)
    owner = run.network(net)  # holds the (possibly sharded) parameters the EMAs mirror, under their own names
    emas = {"sample": EMA(owner, cfg.ema.decay, cfg.ema.warmup, root=net)}
    teacher_decay = cfg.objective_class.teacher_decay(cfg.objective_cfg)
    if teacher_decay > 0:
        emas["teacher"] = EMA(owner, teacher_decay, warmup=False, root=net)
    posthoc = SnapshotTracker(cfg.ema, owner, net, run.output_dir) if cfg.ema.posthoc else None
    if posthoc is not None:     # ema.posthoc: the power-function EMAs, updated and checkpointed with the others
        emas.update(posthoc.emas)
    objective = cfg.build_objective(teacher(net, owner, emas.get("teacher")))

    # ---- resume: checkpoints carry both EMAs (per process under FSDP, so shards stay with their owner)
    # The VAE's identity includes its latent normalisation: a resume whose measured statistics differ is refused.
    identity = RunIdentity("train_unet", cfg, MODEL_SECTIONS, vae=vae_id if vae is source_vae else vae_identity(vae),
                           data=latents.fingerprint(),
                           text_encoder=text_encoder.identity if text_encoder is not None else None,
                           sizes=to_dict(sizes), store=str(latents.folder))
    run.start(identity, emas, sharded_emas=run.accelerator.distributed_type == DistributedType.FSDP)
    if posthoc is not None:
        posthoc.begin(run)
    if run.is_main and (not run.args.resume or not (frozen_vae / "config.json").is_file()):
        write_or_fail(lambda: save_vae(source_vae, frozen_vae), f"the copy of the VAE in {frozen_vae}",
                      "the checkpoints are untouched")

    # Micro-batch m = step * grad_accum + micro. With train.ot_pairing the data is read a pool at a time,
    # so a resumed run starts it at its pool's first micro-batch and builds that pool again.
    pool_size = tcfg.ot_pool if tcfg.ot_pairing else 1
    first_micro = run.state.step * tcfg.grad_accum // pool_size * pool_size
    batches = iter(make_loader(train_latents, tcfg.batch_size, tcfg.seed, run.rank, run.world, first_micro,
                               cfg.data.num_workers))

    def micro_batch(m: int):
        """``(x1, cond)`` of micro-batch ``m``: the next cached batch, its latents drawn from their posteriors."""
        step, micro = divmod(m, tcfg.grad_accum)
        batch = next(batches)
        shared = step_generator(tcfg.seed, step, micro, SHARED_STREAM, device)
        mean, std = batch["mean"].to(device, non_blocking=True), batch["std"].to(device, non_blocking=True)
        x1 = vae.normalize(mean + std * process_share_randn(mean.shape, shared, run.rank, run.world))
        if tcfg.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
        return x1, batch_condition(batch, cfg.cond.type, device)

    def paired_noise(m: int, x1: torch.Tensor) -> torch.Tensor:
        return randn_like(x1, paired_noise_generator(tcfg.seed, *divmod(m, tcfg.grad_accum), run.rank, device))

    pool = (PairedPool(pool_size, micro_batch, paired_noise, by_class=cfg.cond.type == "class")
            if tcfg.ot_pairing else None)
    grid_cond = conditions(spec, latents, range(cfg.sample.num_images))
    grid_cond = None if grid_cond is None else grid_cond.to(device)
    grid_captions = condition_captions(spec.cond_type, latents, range(cfg.sample.num_images), spec.num_classes)
    if text_encoder is not None and run.is_main:
        logger.info("sample grids: one image per caption, in turn: %s", "; ".join(grid_captions[:len(latents)]))

    def export() -> None:
        export_networks(run, net, emas["sample"], cfg, sizes, vae_record,
                        text_encoder.record() if text_encoder is not None else None)

    if run.finished:    # resumed with no step left: killed after its last checkpoint, perhaps before the export
        with run.exporting():
            export()

    # ---- loop
    for step in run.steps():
        lr = set_lr(optimizer, tcfg.lr, lr_factor(step, tcfg))
        net.train()
        losses = []
        for micro in range(tcfg.grad_accum):
            m = step * tcfg.grad_accum + micro
            if pool is None:
                (x1, cond), noise = micro_batch(m), None
            else:
                x1, cond, noise = pool(m)
            # index: this micro-batch's place in the run, which rotates the shortcut levels
            draws = Draws(step_generator(tcfg.seed, step, micro, run.rank, device), index=m * run.world + run.rank,
                          noise=noise)
            with run.accelerator.accumulate(net):
                with run.accelerator.autocast():
                    loss, logs = objective.loss(net, x1, cond, draws)
                run.accelerator.backward(loss)
            losses.append(loss.detach())
        update = run.update({"net": (optimizer, net.parameters())}, losses)
        for ema in emas.values():      # the EMAs follow applied steps only (decided on the device)
            ema.update(owner, update.finite)

        # ---- log: scalars, and sample grids from the slow EMA at several step counts
        if run.every(tcfg.log_every):
            run.log({**to_scalars(logs), "loss": float(torch.stack(losses).mean()), "lr": lr,
                     "grad_norm": float(update.grad_norms["net"])})
        if run.every(tcfg.image_log_every):
            net.eval()
            with emas["sample"].swapped(owner):
                rows = [decode_latents(vae, generate_latents(net, spec, grid_cond, range(cfg.sample.num_images),
                                                             steps, cfg_scale=cfg.sample.cfg_scale, device=device),
                                       batch_size=tcfg.batch_size)
                        for steps in cfg.sample.steps]
            run.log_samples("samples/rows_" + "_".join(str(s) for s in cfg.sample.steps) + "_steps",
                            SampleGrid(rows, [f"{s} step{'s' * (s != 1)}" for s in cfg.sample.steps], grid_captions,
                                       grid_cond.cpu() if spec.cond_type == "mask" else None))

        # ---- scores: validation loss of the online weights, FID of the sampling EMA
        if evaluator.due(run.state.step):
            net.eval()
            scores = to_scalars(evaluator.validation(objective, net), prefix="val/")
            with emas["sample"].swapped(owner):
                scores.update(evaluator.fid(net, vae))
            run.accelerator.log(scores, step=run.state.step)
            if run.is_main:
                logger.info("step %d: %s", run.state.step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))

        # ---- post-hoc EMA snapshots, checkpoint and export
        if posthoc is not None and posthoc.due(run):
            posthoc.save(run, net)
        if run.checkpoint_due():
            run.save_checkpoint()
            with run.exporting():
                export()


if __name__ == "__main__":
    run_cli(main)
