"""The networks: the stage-2 denoisers (one file each, with its own config) and the stage-1 VAE.

``ARCHITECTURES`` is the one place ``model.arch`` is looked up: a new network is one file (a
:class:`modules.core.networks.denoiser.Denoiser` with a ``Config`` dataclass) and one line here.
"""
from __future__ import annotations

from modules.core.networks.denoiser import CondConfig, Denoiser, Sizes
from modules.core.networks.dit import DiT
from modules.core.networks.icdit import ICDiT
from modules.core.networks.unet import UNet

ARCHITECTURES: dict[str, type[Denoiser]] = {"unet": UNet, "dit": DiT, "icdit": ICDiT}


def build_network(cfg, cond_cfg: CondConfig, sizes: Sizes) -> Denoiser:
    """A freshly initialised network of ``cfg.arch`` (configs are validated where they are built)."""
    return ARCHITECTURES[cfg.arch](cfg, cond_cfg, sizes)
