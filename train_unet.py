"""Stage 2: train a UNet or a DiT in a VAE's latent space (shortcut, flow, MeanFlow or DDPM objective).

    accelerate launch train_unet.py --config seed --data ./my_images --vae runs/vae \
        --output-dir runs/unet objective=shortcut cond.type=class
    python train_unet.py --config tiny --data data/shapes --vae runs/vae_tiny --output-dir runs/unet_tiny --report-to none

Reads top to bottom: setup (frozen VAE and text encoder, network (model.arch), latent cache, two EMAs),
loop, log (sample grids from the EMA weights), checkpoint, export. The loss is in modules/objectives.py, the
samplers in modules/samplers.py, the loop's mechanics in modules/optim.py and modules/checkpoint.py.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from modules.run.accelerator import adam, make_accelerator, prepare_network
from modules.run.checkpoint import (Checkpointer, RunIdentity, StopRequest, TrainingState, checkpoint_if_due, count_step,
                               export_or_fail, saved_on_data_error, write_or_fail)
from modules.config.cli import build_parser, resolve_run_config, run_cli
from modules.config.schema import UNetRunConfig, check_trained
from modules.config.io import to_dict
from modules.data.dataset import build_dataset
from modules.interop.dit import load_init_weights
from modules.core.ema import EMA, load_emas, replicas_agree, save_emas, teacher
from modules.errors import ConfigError
from modules.run.export import find_model_folder, save_unet
from modules.core.generation import GenerationSpec, batch_condition, conditions, decode_latents, generate_latents
from modules.data.image_io import make_grid
from modules.data.latent_cache import build_or_load
from modules.core.draws import randn_like
from modules.core.objectives import Draws, build_objective
from modules.run.optim import apply_update, lr_factor, set_lr
from modules.data.order import make_loader
from modules.core.ot_pairing import PairedPool
from modules.run.output_dir import claim_output_dir, save_run_config
from modules.core.seeding import SHARED_STREAM, paired_noise_generator, process_share_randn, step_generator
from modules.run.tracking import Throughput, check_tracker, init_trackers, log_image, memory_stats, to_scalars
from modules.eval.training import TrainingEvaluator
from modules.core.networks import build_network
from modules.interop.clip import TextEncoder
from modules.interop.vae import load_vae, save_vae, vae_identity

logger = logging.getLogger("train_unet")
MODEL_SECTIONS = ("model", "cond", "objective", "shortcut.denoise_timesteps")   # what a resume may not change


def derive_fields(cfg: UNetRunConfig, vae, dataset, text_encoder=None) -> None:
    """Fill the config fields that follow from the VAE, the data, the objective and the text encoder."""
    cfg.model.in_channels = vae.config.latent_channels
    cfg.model.num_step_levels = cfg.num_step_levels
    cfg.model.step_input = cfg.step_input
    cfg.model.guidance_input = cfg.guidance_input
    cfg.cond.image_downsample = vae.config.downsample_factor
    if text_encoder is not None:
        cfg.model.context_dim, cfg.cond.text_tokens = text_encoder.width, text_encoder.tokens
    if cfg.cond.type == "class":
        if dataset.num_classes < 2:
            raise ConfigError(f"cond.type=class needs class sub-folders (or a label column) in {cfg.data.path}; "
                              f"found {dataset.num_classes} class(es)")
        cfg.cond.num_classes = dataset.num_classes


def export_unet(accelerator, unet, ema: EMA, cfg: UNetRunConfig, vae_record: dict, output_dir: Path,
                text_record=None) -> None:
    """Write ``unet`` (online weights) and ``unet_ema`` (sampling EMA) model folders."""
    owner = accelerator.unwrap_model(unet)
    online = accelerator.get_state_dict(unet)
    with ema.swapped(owner):
        # get_state_dict may return views of the live parameters: copy before they are swapped back.
        averaged = {k: v.clone() for k, v in accelerator.get_state_dict(unet).items()}
    if accelerator.is_main_process:
        save_unet(output_dir / "unet", online, cfg, vae_record, weights="online", text_encoder=text_record)
        save_unet(output_dir / "unet_ema", averaged, cfg, vae_record, weights="ema", text_encoder=text_record)


def main(argv=None) -> None:
    parser = build_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--vae", default=None, help="exported VAE folder or a train_vae.py output dir")
    args = parser.parse_intermixed_args(argv)
    if args.vae is not None:
        args.overrides.append(f"vae={args.vae}")
    cfg = resolve_run_config(args, UNetRunConfig, "unet")
    if not cfg.vae:
        raise ConfigError("no VAE given: pass --vae PATH (an exported VAE folder or a train_vae.py output dir)")
    check_tracker(args.report_to)
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(cfg.train, output_dir, args.report_to)
    with claim_output_dir(accelerator, output_dir, args.resume):
        train(cfg, args, accelerator, output_dir)
    accelerator.end_training()


def train(cfg: UNetRunConfig, args, accelerator, output_dir: Path) -> None:
    device, tcfg = accelerator.device, cfg.train
    rank, world = accelerator.process_index, accelerator.num_processes

    # ---- frozen VAE, data
    vae_folder = find_model_folder(cfg.vae, "vae")
    vae = load_vae(vae_folder).to(device).eval().requires_grad_(False)
    vae_id = vae_identity(vae)
    frozen_vae = output_dir / "frozen_vae"     # this run's copy: its UNets stay usable if the VAE trains on
    vae_record = {"path": str(vae_folder.resolve()), "copy": str(frozen_vae.resolve()), "identity": vae_id,
                  "model": to_dict(vae.config)}
    scale = vae.config.scale_factor
    cfg.data.masks = cfg.cond.type == "mask"
    # Text: the encoder's files are hashed and its tokenizer read now; its weights only if captions need encoding.
    text_encoder = TextEncoder(cfg.cond.text_encoder, cfg.cond.text_layer, device) if cfg.cond.type == "text" else None
    captions = (cfg.cond.caption_column, cfg.cond.allow_empty_caption) if text_encoder is not None else ()
    dataset = build_dataset(cfg.data, *captions)
    if cfg.data.vflip or cfg.data.rot90 or cfg.data.random_crop_scale < 1:
        logger.warning("stage 2 trains on cached latents of centre crops and their horizontal flips: "
                       "data.vflip, data.rot90 and data.random_crop_scale are ignored")
    derive_fields(cfg, vae, dataset, text_encoder)
    check_trained(cfg)   # rules of the derived fields (a DiT's patch must divide the latent size)

    # ---- the network, before the latent cache: pretrained weights that do not fit stop the run at once
    torch.manual_seed(tcfg.seed)
    unet = build_network(cfg.model, cfg.cond)
    if cfg.init_from:   # a resumed run's checkpoint then replaces these weights
        load_init_weights(unet, cfg)

    # ---- latent cache, evaluation
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else output_dir.parent / "latent_cache"
    latents = build_or_load(accelerator, vae, vae_id, dataset, cfg.data, cache_root, tcfg.batch_size, text_encoder)
    if text_encoder is not None:    # the null condition: the empty prompt's embedding, kept with the weights
        unet.conditioner.null_text.copy_(latents.null_text)
    train_latents, val_latents = latents.split(cfg.eval.val_images) if cfg.eval.val_images else (latents, None)
    spec = GenerationSpec.from_run_config(cfg)
    evaluator = TrainingEvaluator(cfg, accelerator, spec, latents, scale, val_latents)   # a bad reference stops here

    # ---- optimizer, the two EMAs (slow: sampling/export; fast: shortcut teacher)
    optimizer = adam(unet.parameters(), tcfg.lr, tcfg, device, tcfg.weight_decay)
    unet, optimizer = prepare_network(accelerator, tcfg, unet, optimizer)
    owner = accelerator.unwrap_model(unet)  # holds the (possibly sharded) parameters the EMAs mirror
    emas = {"sample": EMA(owner, cfg.ema.decay, cfg.ema.warmup, root=unet)}
    if cfg.objective == "shortcut" and cfg.shortcut.teacher_ema_decay > 0:
        emas["teacher"] = EMA(owner, cfg.shortcut.teacher_ema_decay, warmup=False, root=unet)
    objective = build_objective(cfg, teacher(unet, owner, emas.get("teacher")))

    # ---- checkpoints carry both EMAs (per process under FSDP, so shards stay with their owner)
    per_rank_ema = accelerator.distributed_type == DistributedType.FSDP

    def save_ema_state(path: Path) -> None:
        if not per_rank_ema and world > 1:
            replicas_agree(emas, accelerator.gather)
            if accelerator.is_main_process:
                logger.info("EMA weights identical on all %d processes", world)
        if per_rank_ema or accelerator.is_main_process:
            save_emas(path, emas, rank)

    state = TrainingState()
    identity = RunIdentity("train_unet", to_dict(cfg), MODEL_SECTIONS, vae=vae_id, data=dataset.fingerprint(),
                           defaults=to_dict(UNetRunConfig()),
                           text_encoder=text_encoder.identity if text_encoder is not None else None)
    checkpointer = Checkpointer(accelerator, output_dir, tcfg.keep_checkpoints, state, identity, save_ema_state,
                                lambda path: load_emas(path, emas, rank if per_rank_ema else 0, device))
    save_run_config(accelerator, output_dir, cfg)
    checkpointer.load(args.resume)
    accelerator.step = 0  # resumes sit on an optimizer-step boundary, whatever grad_accum was
    if accelerator.is_main_process and (not args.resume or not (frozen_vae / "config.json").is_file()):
        write_or_fail(lambda: save_vae(vae, frozen_vae), f"the copy of the VAE in {frozen_vae}",
                      "the checkpoints are untouched")

    # Micro-batch m = step * grad_accum + micro. With train.ot_pairing the data is read a pool at a time,
    # so a resumed run starts it at its pool's first micro-batch and builds that pool again.
    pool_size = tcfg.ot_pool if tcfg.ot_pairing else 1
    first_micro = state.step * tcfg.grad_accum // pool_size * pool_size
    batches = iter(make_loader(train_latents, tcfg.batch_size, tcfg.seed, rank, world, first_micro,
                               cfg.data.num_workers))

    def micro_batch(m: int):
        """``(x1, cond)`` of micro-batch ``m``: the next cached batch, its latents drawn from their posteriors."""
        step, micro = divmod(m, tcfg.grad_accum)
        batch = next(batches)
        shared = step_generator(tcfg.seed, step, micro, SHARED_STREAM, device)
        mean, std = batch["mean"].to(device, non_blocking=True), batch["std"].to(device, non_blocking=True)
        x1 = (mean + std * process_share_randn(mean.shape, shared, rank, world)) * scale
        if tcfg.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
        return x1, batch_condition(batch, cfg.cond.type, device)

    def paired_noise(m: int, x1: torch.Tensor) -> torch.Tensor:
        return randn_like(x1, paired_noise_generator(tcfg.seed, *divmod(m, tcfg.grad_accum), rank, device))

    pool = PairedPool(pool_size, micro_batch, paired_noise) if tcfg.ot_pairing else None
    grid_cond = conditions(spec, latents, range(cfg.sample.num_images))
    grid_cond = None if grid_cond is None else grid_cond.to(device)
    if text_encoder is not None and accelerator.is_main_process:
        shown = [latents.caption(i % len(latents)) for i in range(min(cfg.sample.num_images, len(latents)))]
        logger.info("sample grids: one image per caption, in turn: %s", "; ".join(shown))
    init_trackers(accelerator, "ldm-unet", cfg, output_dir, args.report_to)
    throughput = Throughput(tcfg.batch_size * tcfg.grad_accum * world)

    def export() -> None:
        export_unet(accelerator, unet, emas["sample"], cfg, vae_record, output_dir,
                    text_encoder.record() if text_encoder is not None else None)

    if state.step >= tcfg.max_steps:
        # Resumed with no step left: killed after its last checkpoint, perhaps before the export.
        export_or_fail(export, output_dir, state.step)

    # ---- loop
    with StopRequest(accelerator) as stop, saved_on_data_error(checkpointer, state), \
            tqdm(total=tcfg.max_steps, initial=state.step, disable=not accelerator.is_local_main_process,
                 desc=f"unet/{cfg.objective}") as progress:
        while state.step < tcfg.max_steps:
            lr = set_lr(optimizer, tcfg.lr, lr_factor(state.step, tcfg))
            unet.train()
            losses = []
            for micro in range(tcfg.grad_accum):
                m = state.step * tcfg.grad_accum + micro
                if pool is None:
                    (x1, cond), noise = micro_batch(m), None
                else:
                    x1, cond, noise = pool(m)
                # index: this micro-batch's place in the run, which rotates the shortcut levels
                draws = Draws(step_generator(tcfg.seed, state.step, micro, rank, device), index=m * world + rank,
                              noise=noise)
                with accelerator.accumulate(unet):
                    with accelerator.autocast():
                        loss, logs = objective.loss(unet, x1, cond, draws)
                    accelerator.backward(loss)
                losses.append(loss.detach())
            update = apply_update(accelerator, {"unet": (optimizer, unet.parameters())}, losses, tcfg.grad_clip)

            # ---- EMAs follow applied steps only, skipped (non-finite) steps are counted: both decided
            # on the device, the count read on logging steps
            for ema in emas.values():
                ema.update(owner, update.finite)
            count_step(state, update.finite, tcfg, checkpointer)
            throughput.tick()
            progress.update(1)

            # ---- log: scalars, and sample grids from the slow EMA at several step counts
            if state.due(tcfg.log_every, tcfg.max_steps):
                scalars = to_scalars(logs)
                scalars.update(loss=float(torch.stack(losses).mean()), lr=lr,
                               grad_norm=float(update.grad_norms["unet"]), images_per_s=throughput.rate(),
                               bad_steps=state.bad_steps, **memory_stats(device))
                accelerator.log(scalars, step=state.step)
                progress.set_postfix(loss=f"{scalars['loss']:.4f}")
            if state.due(tcfg.image_log_every, tcfg.max_steps):
                unet.eval()
                with emas["sample"].swapped(owner):
                    rows = [decode_latents(vae, generate_latents(unet, spec, grid_cond, range(cfg.sample.num_images),
                                                                 steps, cfg_scale=cfg.sample.cfg_scale, device=device),
                                           scale, batch_size=tcfg.batch_size)
                            for steps in cfg.sample.steps]
                log_image(accelerator, "samples/rows_" + "_".join(str(s) for s in cfg.sample.steps) + "_steps",
                          make_grid(rows), state.step, output_dir)

            # ---- scores: validation loss of the online weights, FID of the sampling EMA
            if evaluator.due(state.step):
                unet.eval()
                scores = to_scalars(evaluator.validation(objective, unet), prefix="val/")
                with emas["sample"].swapped(owner):
                    scores.update(evaluator.fid(unet, vae))
                accelerator.log(scores, step=state.step)
                if accelerator.is_main_process:
                    logger.info("step %d: %s", state.step, ", ".join(f"{k} {v:.4g}" for k, v in sorted(scores.items())))

            # ---- checkpoint and export
            if checkpoint_if_due(state, tcfg, stop, checkpointer, export, output_dir):
                break


if __name__ == "__main__":
    run_cli(main)
