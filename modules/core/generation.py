"""From noise seeds and conditions to images: the pieces sample.py and train-time grids share.

Both build a :class:`GenerationSpec` from the same resolved run config (during training, the
run's; in sample.py, the one the export recorded), so both paths generate identically.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.config.schema import DDPMConfig, UNetRunConfig
from modules.core.objectives import DDPMSchedule, ModelCall
from modules.core.samplers import guided, sample
from modules.config.sampling import DEFAULT_SAMPLER
from modules.core.seeding import initial_noise, noise_generators

# The tests' override of the compiler backend (e.g. aot_eager): inductor takes minutes to compile
# on a CPU. Unset, sampling compiles with inductor's "reduce-overhead" mode (CUDA graphs on GPUs).
COMPILE_BACKEND_ENV = "LDM_COMPILE_BACKEND"


@dataclass
class GenerationSpec:
    """What a trained network needs to be sampled."""
    objective: str
    latent_channels: int
    latent_size: int
    denoise_timesteps: int
    ddpm: DDPMConfig
    cond_type: str
    num_classes: int
    guidance_input: bool = False    # the network takes the guidance scale (intrinsic guidance)

    @classmethod
    def from_run_config(cls, cfg: UNetRunConfig) -> "GenerationSpec":
        return cls(cfg.objective, cfg.model.in_channels, cfg.latent_size, cfg.shortcut.denoise_timesteps,
                   cfg.ddpm, cfg.cond.type, cfg.cond.num_classes, cfg.model.guidance_input)


@torch.no_grad()
def generate_latents(unet, spec: GenerationSpec, cond: Optional[torch.Tensor], seeds: Sequence[int], steps: int,
                     sampler: Optional[str] = None, cfg_scale: float = 1.0, eta: float = 0.0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Latents (unscaled by the VAE factor) for one batch; row i depends only on seeds[i] and cond[i].

    ``sampler`` and ``steps`` must pass ``modules.sampling_rules.sampling_problem``, and ``cfg_scale``
    ``modules.sampling_rules.guidance_problem`` (callers check them where the request is made: the config,
    sample.py's arguments).
    """
    method = sampler or DEFAULT_SAMPLER[spec.objective]
    noise = initial_noise(seeds, (spec.latent_channels, spec.latent_size, spec.latent_size), device=device)
    fn = guided(unet, cond, cfg_scale, intrinsic=spec.guidance_input)
    if spec.objective == "shortcut" and method != "shortcut":
        fn = at_finest_level(fn, spec.denoise_timesteps)
    if spec.objective == "meanflow" and method != "meanflow":
        fn = at_zero_interval(fn)
    if method in ("ddim", "ddpm"):
        return sample(method, fn, noise, steps, schedule=DDPMSchedule.from_config(spec.ddpm),
                      generators=noise_generators(seeds), **({"eta": eta} if method == "ddim" else {}))
    return sample(method, fn, noise, steps)


def at_finest_level(fn, denoise_timesteps: int):
    """A shortcut model used as a plain flow model (Euler/Heun): always ask for step d = 1/M."""
    finest = denoise_timesteps.bit_length() - 1

    def flow_fn(x, t, level=None):
        return fn(x, t, torch.full((x.shape[0],), finest, dtype=torch.long, device=x.device))
    return flow_fn


def at_zero_interval(fn):
    """A MeanFlow model used as a plain flow model (Euler/Heun): u(z, t, h = 0) is the instantaneous velocity."""
    def flow_fn(x, t, level=None):
        return fn(x, t, torch.zeros(x.shape[0], device=x.device))
    return flow_fn


def compile_options() -> dict:
    """torch.compile's arguments for sampling: mode="reduce-overhead" (inductor; CUDA graphs on GPUs),
    or the backend named by $LDM_COMPILE_BACKEND. Static shapes: one graph per batch size (sampling
    sees one, plus a smaller last batch), which CUDA graphs replay fastest."""
    backend = os.environ.get(COMPILE_BACKEND_ENV)
    return {"dynamic": False, **({"backend": backend} if backend else {"mode": "reduce-overhead"})}


def compiled_for_sampling(unet: torch.nn.Module, vae: torch.nn.Module) -> ModelCall:
    """Compile the VAE's decoder in place and return the UNet's compiled call, for
    ``generate_latents`` and ``decode_latents``; the weights and their names do not change.

    The call's output is cloned: a CUDA graph writes every replay's output into the same memory,
    and samplers keep one output across the next call (Heun's first velocity)."""
    options = compile_options()
    vae.decoder.compile(**options)
    network = torch.compile(unet, **options)
    return lambda *args, **kwargs: network(*args, **kwargs).clone()


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale_factor: float, batch_size: int) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents, decoded in batches."""
    dtype = next(vae.parameters()).dtype
    out = [vae.decode(chunk.to(dtype) / scale_factor).float().clamp(-1, 1)
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
