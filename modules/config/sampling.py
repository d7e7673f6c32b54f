"""Which samplers, step counts and guidance scales fit a trained model: the one home of these rules.

The run config checks its own sample grids and evaluation steps with them (modules/config.py);
sample.py checks its arguments; samplers and generation trust a checked request.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from modules.core.settings import is_power_of_two

if TYPE_CHECKING:
    from modules.config.schema import UNetRunConfig

# Which samplers fit which objective, and the one each uses by default.
SAMPLERS_FOR = {"shortcut": ("shortcut", "euler", "heun"), "flow": ("euler", "heun"), "ddpm": ("ddim", "ddpm"),
                "meanflow": ("meanflow", "euler", "heun")}
DEFAULT_SAMPLER = {"shortcut": "shortcut", "flow": "euler", "ddpm": "ddim", "meanflow": "meanflow"}


def sampling_problem(objective: str, sampler: str, steps: int, denoise_timesteps: int,
                     num_timesteps: int) -> Optional[str]:
    """Why a model trained with ``objective`` cannot be sampled so, or None: the one home of these rules."""
    if sampler not in SAMPLERS_FOR[objective]:
        return f"sampler {sampler} does not fit a {objective} model (use one of {', '.join(SAMPLERS_FOR[objective])})"
    if steps < 1:
        return f"steps must be an integer >= 1, got {steps}"
    if sampler == "shortcut" and (not is_power_of_two(steps) or steps > denoise_timesteps):
        rule = (f"shortcut sampling needs a power of two between 1 and the model's denoise_timesteps="
                f"{denoise_timesteps} (1, 2, 4, ..., {denoise_timesteps})")
        if is_power_of_two(steps):
            return f"{steps} steps exceeds the trained maximum of {denoise_timesteps}: {rule}"
        return f"{rule}, got {steps}"
    if sampler in ("ddim", "ddpm") and steps > num_timesteps:
        return f"{steps} steps: must be <= the schedule's {num_timesteps} timesteps (ddpm.num_timesteps)"
    return None


def guidance_problem(cfg: UNetRunConfig, scale: float) -> Optional[str]:
    """Why a model trained as ``cfg`` cannot be sampled at guidance ``scale``, or None."""
    low, high = cfg.shortcut.guidance_range
    if cfg.guidance_input and not low <= scale <= high:
        return (f"guidance scale {scale}: this model takes the scale as an input (shortcut.intrinsic_guidance) "
                f"and was trained for {low} to {high} (shortcut.guidance_range)")
    return None


def unconditional_problem(cfg: UNetRunConfig, scale: float) -> Optional[str]:
    """Why guidance ``scale`` cannot be applied to a model trained as ``cfg`` because it never learnt the
    unconditional prediction, or None. Asked where images are requested (sample.py, evaluate.py sweep),
    not of saved configs, so a model trained so still loads and samples at scale 1."""
    if not cfg.guidance_input and scale != 1 and cfg.cond.type != "none" and cfg.cond.drop == 0:
        return (f"guidance scale {scale} needs the unconditional prediction, and this model was trained with "
                "cond.drop=0 (no condition dropout), so it has none")
    return None
