"""From noise seeds and conditions to images: the pieces sample.py and train-time grids share.

A :class:`GenerationSpec` says what a trained UNet needs to be sampled (objective, latent
shape, step-size levels, DDPM schedule); it is built from a run config during training
and from an exported ``config.json`` in sample.py, so both paths generate identically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from modules.config import DDPMConfig, UNetRunConfig, from_dict
from modules.objectives import DDPMSchedule
from modules.samplers import guided, initial_noise, noise_generators, sample

DEFAULT_SAMPLER = {"shortcut": "shortcut", "flow": "euler", "ddpm": "ddim"}
SAMPLERS_FOR = {"shortcut": ("shortcut", "euler", "heun"), "flow": ("euler", "heun"), "ddpm": ("ddim", "ddpm")}


@dataclass
class GenerationSpec:
    objective: str
    latent_channels: int
    latent_size: int
    denoise_timesteps: int
    ddpm: DDPMConfig
    cond_type: str
    num_classes: int

    @classmethod
    def from_run_config(cls, cfg: UNetRunConfig) -> "GenerationSpec":
        return cls(cfg.objective, cfg.model.in_channels, cfg.data.image_size // cfg.cond.image_downsample,
                   cfg.shortcut.denoise_timesteps, cfg.ddpm, cfg.cond.type, cfg.cond.num_classes)

    @classmethod
    def from_export(cls, config: dict) -> "GenerationSpec":
        return cls(config["objective"], config["model"]["in_channels"], config["latent_size"],
                   config["shortcut"]["denoise_timesteps"], from_dict(DDPMConfig, config["ddpm"]),
                   config["cond"]["type"], config["cond"]["num_classes"])


def sample_seed(base_seed: int, index: int) -> int:
    """Seed of image ``index``: a function of (base seed, index) only, never of the batch.

    Torch's CPU generator keeps only the low 32 bits of a seed, so (base, index) is mixed
    (splitmix64) into 32 bits: different base seeds give unrelated images instead of the
    shifted copies that ``base + index`` would give.
    """
    z = ((int(base_seed) << 32) + int(index) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0xFFFFFFFF


@torch.no_grad()
def generate_latents(unet, spec: GenerationSpec, cond: Optional[torch.Tensor], seeds: Sequence[int], steps: int,
                     sampler: Optional[str] = None, cfg_scale: float = 1.0, eta: float = 0.0,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Latents (unscaled by the VAE factor) for one batch; row i depends only on seeds[i] and cond[i]."""
    method = sampler or DEFAULT_SAMPLER[spec.objective]
    if method not in SAMPLERS_FOR[spec.objective]:
        raise ValueError(f"sampler {method!r} does not fit a {spec.objective} model "
                         f"(use one of {', '.join(SAMPLERS_FOR[spec.objective])})")
    shape = (spec.latent_channels, spec.latent_size, spec.latent_size)
    noise = initial_noise(seeds, shape, device=device)
    fn = guided(unet, cond, cfg_scale)
    if spec.objective == "shortcut" and method != "shortcut":
        fn = at_finest_level(fn, spec.denoise_timesteps)
    if method == "shortcut":
        return sample(method, fn, noise, steps, max_steps=spec.denoise_timesteps)
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


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, scale_factor: float, batch_size: int) -> torch.Tensor:
    """Images in [-1, 1] from scaled latents, decoded in batches."""
    dtype = next(vae.parameters()).dtype
    out = [vae.decode(chunk.to(dtype) / scale_factor).float().clamp(-1, 1)
           for chunk in latents.split(max(1, batch_size))]
    return torch.cat(out)


def grid_conditions(spec: GenerationSpec, latent_set, n: int) -> Optional[torch.Tensor]:
    """Conditions for train-time sample grids: classes in turn, or the first n cached masks."""
    if spec.cond_type == "class":
        return torch.arange(n) % spec.num_classes
    if spec.cond_type == "mask":
        return torch.stack([latent_set[i % len(latent_set)]["mask"] for i in range(n)])
    return None


def batch_condition(batch: dict, cond_type: str, device: torch.device) -> Optional[torch.Tensor]:
    """The condition tensor of a training batch for ``cond_type`` (none|class|mask)."""
    if cond_type == "class":
        return batch["label"].to(device)
    if cond_type == "mask":
        return batch["mask"].to(device)
    return None
