"""Helpers the tests share (not fixtures): networks built for the sizes a run would derive."""
from __future__ import annotations

from modules.core.networks import build_network
from modules.core.networks.denoiser import Denoiser, Sizes


def sizes_of(cfg, latent_channels: int = 4, downsample: int = 8, num_classes: int = 0, text_tokens: int = 0,
             text_width: int = 0) -> Sizes:
    """The sizes a run of ``cfg`` (a UNetRunConfig) derives from a VAE with ``latent_channels`` and
    ``downsample``, data with ``num_classes`` classes and a text encoder of ``text_tokens`` x ``text_width``."""
    text = cfg.cond.type == "text"
    return Sizes(latent_channels=latent_channels, latent_size=cfg.data.image_size // downsample,
                 image_downsample=downsample, num_classes=num_classes if cfg.cond.type == "class" else 0,
                 text_tokens=text_tokens if text else 0, text_width=text_width if text else 0,
                 inputs=cfg.objective_class.network_inputs(cfg.objective_cfg))


def network_of(cfg, **sizes) -> Denoiser:
    """A freshly initialised network of ``cfg`` for :func:`sizes_of` ``(cfg, **sizes)``."""
    return build_network(cfg.model, cfg.cond, sizes_of(cfg, **sizes))
