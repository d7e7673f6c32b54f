"""The one place a stage-2 network is built: ``model.arch`` names the class (unet or dit)."""
from __future__ import annotations

from modules.config.schema import CondConfig, UNetModelConfig
from modules.core.networks.denoiser import Denoiser
from modules.core.networks.dit import DiT
from modules.core.networks.unet import UNet

ARCHITECTURES = {"unet": UNet, "dit": DiT}


def build_network(model_cfg: UNetModelConfig, cond_cfg: CondConfig) -> Denoiser:
    """A freshly initialised network of ``model_cfg.arch`` (configs are validated where they are built)."""
    return ARCHITECTURES[model_cfg.arch](model_cfg, cond_cfg)
