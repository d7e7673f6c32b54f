"""Stage-2 configs saved in the earlier layout, read in today's (exports and checkpoints keep loading).

Until December 2026 a run's config held one flat ``model`` section with the fields of both networks
and the sizes the run derived (``model.in_channels``, ``num_step_levels``, ``step_input``,
``guidance_input``; ``cond.num_classes``, ``image_downsample``, ``text_tokens``; ``data.masks``), and
the shortcut's wavelet loss under ``loss.wavelet_levels``. Today ``model`` holds only the fields of
its ``model.arch``, the derived sizes are a record of their own (``Sizes``), and the wavelet loss is
``shortcut.wavelet_levels``. :func:`upgrade` turns the old layout into the new (a config already in
the new layout passes unchanged), :func:`legacy_sizes` reads the sizes out of an old one.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

DERIVED_COND = ("num_classes", "image_downsample", "text_tokens")
# The fields each network read in that layout (the others were carried along unread).
NETWORK_FIELDS = {
    "unet": ("base_channels", "channel_mult", "num_res_blocks", "attention_levels", "head_dim", "transformer_depth",
             "context_dim", "norm_groups", "dropout", "resample"),
    "dit": ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "time_freq_shift"),
}


def is_legacy(values: Any) -> bool:
    """Whether a saved stage-2 config dict has the earlier layout (its model section holds derived sizes)."""
    model = values.get("model") if isinstance(values, dict) else None
    return isinstance(model, dict) and any(key in model for key in ("num_step_levels", "step_input"))


def upgrade(values: Any) -> Any:
    """A saved stage-2 config dict in today's layout (see the module docstring)."""
    if not isinstance(values, dict):
        return values
    values = copy.deepcopy(values)
    if is_legacy(values):
        model = values["model"]
        fields = NETWORK_FIELDS.get(model.get("arch", "unet"), ())
        values["model"] = {key: value for key, value in model.items() if key in fields or key == "arch"}
        if isinstance(values.get("cond"), dict):
            for key in DERIVED_COND:
                values["cond"].pop(key, None)
        if isinstance(values.get("data"), dict):
            values["data"].pop("masks", None)
    loss = values.get("loss")
    if isinstance(loss, dict) and set(loss) <= {"wavelet_levels"}:
        values.pop("loss")
        if "wavelet_levels" in loss:
            values.setdefault("shortcut", {})
            if isinstance(values["shortcut"], dict):
                values["shortcut"]["wavelet_levels"] = loss["wavelet_levels"]
    return values


def legacy_sizes(values: Any) -> Optional[dict]:
    """The sizes (``Sizes`` as a dict) an earlier-layout config recorded, or None for today's layout."""
    if not is_legacy(values):
        return None
    model, cond, data = (values.get(key) if isinstance(values.get(key), dict) else {}
                         for key in ("model", "cond", "data"))
    levels = model.get("num_step_levels", 0)
    step = "interval" if model.get("step_input") == "interval" else "level" if levels else "none"
    downsample = cond.get("image_downsample", 8)
    image_size = data.get("image_size", 256)
    text = cond.get("type") == "text"
    return {"latent_channels": model.get("in_channels", 4),
            "latent_size": image_size // downsample if isinstance(image_size, int) and isinstance(downsample, int)
            and downsample > 0 else image_size,
            "image_downsample": downsample, "num_classes": cond.get("num_classes", 0),
            "text_tokens": cond.get("text_tokens", 0), "text_width": model.get("context_dim", 0) if text else 0,
            "inputs": {"step": step, "levels": levels, "guidance": model.get("guidance_input", False)}}
