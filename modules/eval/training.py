"""Scores during stage-2 training, every ``eval.every`` steps (both off when not configured):

* **FID** of the sampling EMA at ``eval.steps`` (default 1, 4 and the finest): every process
  generates its share of ``eval.num_samples`` images (image i from ``image_seed(EVAL_SEED, i)``
  and condition i, the same at every evaluation) and keeps its features; their moments (count, sum,
  sum of outer products) are summed over the processes and scored against ``eval.reference`` on the
  main process; logged as ``fid/steps_N``.
* **Validation loss** on ``eval.val_images`` latents held out of training: the objective's
  losses with fixed draws (so successive values compare), per step-size level for shortcut
  models (``val/loss_by_level_K``); a level whose loss stalls or climbs shows up here.

The Inception file and the reference are loaded when the run starts (:func:`prepare_fid`), and the
reference's feature width is compared with the extractor's (one forward of a blank image), so a bad
one stops the run before any training, not at its first evaluation.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from modules.config.schema import UNetRunConfig
from modules.core.generation import GenerationSpec, batch_condition, conditions, decode_latents, generate_latents
from modules.core.metrics import frechet_distance
from modules.core.objectives.base import Draws
from modules.core.seeding import image_seed, mix_seed
from modules.data.image_io import to_uint8
from modules.eval.features import (NpzReference, check_feature_width, extract_local, feature_width, load_inception,
                                   share, size_text)

logger = logging.getLogger(__name__)
EVAL_SEED = 0x5EED   # the evaluation images' own seeds, apart from the run's training seed


@dataclass
class FidSetup:
    """What FID during training is measured with: the extractor and the reference's mu and sigma."""
    extractor: torch.nn.Module
    reference: tuple[np.ndarray, np.ndarray]


def prepare_fid(cfg: UNetRunConfig, accelerator) -> Optional[FidSetup]:
    """The extractor and the reference of FID during training (None when it is off), every check made that
    can be made before training (issue 21, rule 6): the reference read (each array once, headers first),
    the Inception file vouched for and loaded, and the reference's feature width compared with the
    extractor's (one forward of a blank image), so a reference of another network stops the run at start-up
    instead of at its first evaluation. Call it before the latent store is encoded; TrainingEvaluator calls it
    when it is not given one."""
    e = cfg.eval
    if not (e.every and e.reference):
        return None
    reference = NpzReference(e.reference)
    stats = reference.stats()
    made_from, size = reference.source_size(), cfg.data.image_size
    if made_from not in (None, (size, size)) and accelerator.is_main_process:
        logger.warning("eval.reference %s was made from %s but this run makes %dx%d px images: its FID "
                       "is a different measurement than one against a reference at %d px",
                       e.reference, size_text(made_from), size, size, size)
    extractor = load_inception(e.inception, accelerator.device, e.inception_sha256)
    check_feature_width(feature_width(extractor, e.image_size, accelerator.device), reference.feature_width(),
                        f"eval.reference={e.reference}", f"eval.inception={e.inception}")
    return FidSetup(extractor, stats)


class TrainingEvaluator:
    def __init__(self, cfg: UNetRunConfig, accelerator, spec: GenerationSpec, latent_set,
                 normalize: Callable[[torch.Tensor], torch.Tensor], val_set=None, fid: Optional[FidSetup] = None):
        """``normalize``: raw latents to what the network models (the frozen VAE's ``normalize``)."""
        self.cfg, self.accelerator, self.spec, self.latent_set = cfg, accelerator, spec, latent_set
        self.normalize, self.val_set = normalize, val_set
        self.warned = False
        fid = fid or prepare_fid(cfg, accelerator)
        self.extractor, self.reference = (fid.extractor, fid.reference) if fid else (None, None)

    @property
    def active(self) -> bool:
        return bool(self.cfg.eval.every) and (self.extractor is not None or self.val_set is not None)

    def due(self, step: int) -> bool:
        return self.active and step % self.cfg.eval.every == 0

    @torch.no_grad()
    def fid(self, net, vae) -> dict[str, float]:
        """FID at each of ``eval.steps`` (call with the sampling EMA's weights in ``net``)."""
        if self.extractor is None:
            return {}
        acc, e = self.accelerator, self.cfg.eval
        mine = range(acc.process_index, e.num_samples, acc.num_processes)
        # Every process runs the same number of batches, a short share ending on stand-in batches whose
        # images are dropped: the wrapped network's forward is a collective (DDP's buffer broadcast,
        # FSDP's all-gathers), and a process that called it fewer times would leave the others waiting.
        num_batches = math.ceil(math.ceil(e.num_samples / acc.num_processes) / e.batch_size)
        scores = {}
        for steps in self.cfg.eval_steps:
            arrays = []
            for start in range(0, num_batches * e.batch_size, e.batch_size):
                idx = list(mine[start:start + e.batch_size])
                real = len(idx)
                idx = idx or [0]
                cond = conditions(self.spec, self.latent_set, idx)
                with acc.autocast():
                    z = generate_latents(net, self.spec, None if cond is None else cond.to(acc.device),
                                         [image_seed(EVAL_SEED, i) for i in idx], steps, device=acc.device)
                    images = decode_latents(vae, z.float(), e.batch_size)
                arrays.extend(to_uint8(images)[:real])
            local = extract_local(arrays, self.extractor, e.batch_size, acc.device, e.image_size, workers=1)
            found = share(local, acc) if acc.num_processes > 1 else local
            if acc.is_main_process and found.count < found.width and not self.warned:
                self.warned = True
                logger.warning("eval.num_samples=%d is below the feature dimension %d: the FID is biased upward "
                               "(compare such values only with each other)", found.count, found.width)
            if acc.is_main_process:
                scores[f"fid/steps_{steps}"] = frechet_distance(*found.statistics(), *self.reference)
        return scores

    @torch.no_grad()
    def validation(self, objective, net) -> dict[str, torch.Tensor]:
        """The objective's logs on the held-out latents, with the same draws at every evaluation."""
        if self.val_set is None:
            return {}
        acc, batch_size = self.accelerator, self.cfg.train.batch_size
        totals: dict[str, list] = {}
        for j, start in enumerate(range(0, len(self.val_set), batch_size)):
            rows = [self.val_set[i] for i in range(start, min(start + batch_size, len(self.val_set)))]
            batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
            generator = torch.Generator().manual_seed(mix_seed(EVAL_SEED, j))
            mean, std = batch["mean"].to(acc.device), batch["std"].to(acc.device)
            noise = torch.randn(mean.shape, generator=generator).to(acc.device)
            x1 = self.normalize(mean + std * noise)
            with acc.autocast():
                _, logs = objective.loss(net, x1, batch_condition(batch, self.cfg.cond.type, acc.device),
                                         Draws(generator, index=j))
            for name, value in logs.items():
                totals.setdefault(name, []).append(value.float().cpu())
        return {name: torch.stack(values).nanmean(dim=0) for name, values in totals.items()}
