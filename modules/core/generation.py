"""From noise seeds and conditions to images: the pieces sample.py, train-time grids and FID share.

All build a :class:`GenerationSpec` from the same resolved run config and sizes (during training,
the run's; in sample.py, the ones the export recorded), so every path generates identically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.core.compiling import sampling_options
from modules.core.networks.denoiser import Sizes
from modules.core.objectives import objective_class
from modules.core.objectives.base import ModelCall
from modules.core.samplers import guided
from modules.core.seeding import initial_noise, noise_generators



@dataclass
class GenerationSpec:
    """What a trained network needs to be sampled: its objective and that objective's section, its sizes
    and its condition type."""
    objective: str
    objective_cfg: object
    sizes: Sizes
    cond_type: str

    @classmethod
    def of(cls, cfg, sizes: Sizes) -> "GenerationSpec":
        """The spec of a stage-2 run config (``UNetRunConfig``) and the sizes its network was built for."""
        return cls(cfg.objective, cfg.objective_cfg, sizes, cfg.cond.type)

    @property
    def num_classes(self) -> int:
        return self.sizes.num_classes


@torch.no_grad()
def generate_latents(net, spec: GenerationSpec, cond: Optional[torch.Tensor], seeds: Sequence[int], steps: int,
                     sampler: Optional[str] = None, cfg_scale: Optional[float] = None, eta: float = 0.0,
                     device: torch.device | str = "cpu",
                     guidance_interval: Optional[tuple[float, float]] = None) -> torch.Tensor:
    """Normalised latents (``vae.denormalize`` gives the VAE's) for one batch; row i depends only on seeds[i]
    and cond[i].

    ``sampler`` (None: the objective's default) and ``steps`` must pass the objective's
    ``sampling_problem``, ``cfg_scale`` its ``guidance_problem`` and ``guidance_interval`` its
    ``guidance_interval_problem`` (callers check them where the request is made: the config, sample.py's
    arguments); None: the objective's defaults (``default_guidance``, ``default_guidance_interval``).
    """
    objective = objective_class(spec.objective)
    s = spec.sizes
    noise = initial_noise(seeds, (s.latent_channels, s.latent_size, s.latent_size), device=device)
    scale = objective.default_guidance(spec.objective_cfg) if cfg_scale is None else cfg_scale
    interval = guidance_interval or objective.default_guidance_interval(spec.objective_cfg)
    fn = guided(net, cond, scale, intrinsic=s.inputs.guidance)
    given = {} if interval is None else {"guidance_interval": interval}     # only to a model that takes one
    return objective.sample(spec.objective_cfg, sampler or objective.samplers[0], fn, noise, steps,
                            noise_generators(seeds), eta, **given)


def compiled_for_sampling(net: torch.nn.Module, vae: torch.nn.Module) -> ModelCall:
    """Compile the VAE's decoder in place and return the network's compiled call, for
    ``generate_latents`` and ``decode_latents``; the weights and their names do not change.

    The call's output is cloned: a CUDA graph writes every replay's output into the same memory,
    and samplers keep one output across the next call (Heun's first velocity)."""
    options = sampling_options()
    vae.decoder.compile(**options)
    network = torch.compile(net, **options)
    return lambda *args, **kwargs: network(*args, **kwargs).clone()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Images in [-1, 1] from normalised latents (what stage 2 models: ``vae.normalize``), decoded in batches."""
    dtype = next(vae.parameters()).dtype
    out = [vae.decode(vae.denormalize(chunk.to(dtype))).float().clamp(-1, 1)
           for chunk in latents.split(max(1, batch_size))]
    return torch.cat(out)


def conditions(spec: GenerationSpec, latent_set, indices: Sequence[int]) -> Optional[torch.Tensor]:
    """Conditions of train-time images ``indices`` (grids, FID): classes in turn, or the cached masks or
    captions' text embeddings in turn (the captions of the first images of the data)."""
    if spec.cond_type == "class":
        return torch.as_tensor(list(indices), dtype=torch.long) % spec.num_classes
    if spec.cond_type in ("mask", "text"):
        return torch.stack([latent_set[i % len(latent_set)][spec.cond_type] for i in indices])
    return None


def batch_condition(batch: dict, cond_type: str, device: torch.device) -> Optional[torch.Tensor]:
    """The condition tensor of a training batch for ``cond_type`` (none|class|mask|text)."""
    if cond_type == "class":
        return batch["label"].to(device, non_blocking=True)
    if cond_type in ("mask", "text"):
        return batch[cond_type].to(device, non_blocking=True)
    return None
