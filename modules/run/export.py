"""Model folders: ``config.json`` + ``model.safetensors`` (like diffusers' save_pretrained).

Weights are only ever read from safetensors, so nothing is unpickled from a user's file.
Folders are written through modules/durable.py (a temporary sibling, then renamed), so a crash
never leaves a half-written export under the final name. A stage-2 export's ``config.json``
holds the resolved run config it was trained with (``run_config``, validated when read back like
a command-line config, and the one source a loader reads, with ``sizes``, what its network was
built for), a summary of it (``model``, ``cond``, ``objective``, ...), which weights it holds
(``online``, ``ema``, or ``posthoc_ema``: an EMA length rebuilt by posthoc_ema.py), the VAE it was
trained with and, for a text-conditioned model, its text encoder (path and identity: sample.py refuses another). Exports of the earlier layout (no
``sizes``; modules/config/legacy.py) still load. The stage-2 folders keep their names ``unet/``
and ``unet_ema/`` whatever the network, so existing runs and scripts keep working.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from modules import durable
from modules.config.io import diff_fields, from_dict, read_json, to_dict, with_defaults
from modules.config.legacy import legacy_sizes
from modules.config.schema import UNetRunConfig, sizes_problem
from modules.core.compiling import without_compiled_prefix
from modules.core.networks import build_network
from modules.core.networks.denoiser import Denoiser, Sizes
from modules.core.networks.vae import AutoencoderKL, VAEConfig
from modules.errors import ConfigError, ModelFolderError
from modules.run.layout import FROZEN_VAE
from modules.run.model_card import CARD_NAME, DEFAULT_LICENSE, network_card, vae_card

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"   # what diffusers' save_pretrained writes
DIFFUSERS_FOLDER = "diffusers"      # an export's diffusers copy: from_pretrained(export, subfolder="diffusers")
logger = logging.getLogger(__name__)


# Writes a diffusers copy of an export into the folder being written (given the weights written), or says why
# there is none; the export's card tells which.
DiffusersWriter = Callable[[Path, dict[str, torch.Tensor]], Optional[str]]


def save_model_folder(folder: str | Path, state_dict: dict[str, torch.Tensor], config: dict,
                      diffusers: Optional[DiffusersWriter] = None) -> Path:
    """Write ``folder`` atomically: config.json (with the weights' digest, ``durable.digest_file``),
    model.safetensors, the ``diffusers/`` copy ``diffusers`` writes (when it can) and the model card README.md."""
    def write(tmp: Path) -> None:
        # the network's own names: never torch.compile's wrapper's (nothing could load them)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in without_compiled_prefix(state_dict).items()}
        save_file(tensors, tmp / WEIGHTS_NAME)
        record = {**config, "digest": {WEIGHTS_NAME: durable.digest_file(tmp / WEIGHTS_NAME)}}
        (tmp / CONFIG_NAME).write_text(json.dumps(record, indent=2) + "\n")
        why_not = diffusers(tmp, tensors) if diffusers is not None else "no diffusers equivalent is written for it"
        (tmp / CARD_NAME).write_text(model_card(record, why_not))
    return durable.write_folder(folder, write)


def model_card(record: dict, diffusers: Optional[str], scores: Optional[list[dict]] = None,
               repo: Optional[str] = None, license: str = DEFAULT_LICENSE) -> str:
    """The model card of an export whose config.json is ``record`` (modules/run/model_card.py); ``diffusers``:
    None when it holds a ``diffusers/`` copy, else why not; ``scores``: rows of an evaluate.py sweep."""
    if record.get("kind") == "vae":
        return vae_card(record, diffusers, repo, license)
    try:
        cfg = from_dict(UNetRunConfig, record["run_config"], CONFIG_NAME)
    except (ConfigError, KeyError, TypeError) as e:
        raise ModelFolderError(f"{CONFIG_NAME}: its run_config does not read ({e})") from None
    return network_card(record, cfg, diffusers, scores, repo, license)


def read_config(folder: str | Path, kind: str | None = None) -> dict:
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no {CONFIG_NAME}; expected an exported model folder")
    config = read_json(path, ModelFolderError)
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if kind is not None and config.get("kind") != kind:
        raise ModelFolderError(f"{folder}: {CONFIG_NAME} holds {describe_kind(config)}, expected a '{kind}'")
    return config


def describe_kind(config: dict) -> str:
    """What a config.json says its model is, for an error: "a 'unet' model", "no 'kind' entry", "'kind': null"."""
    kind = config.get("kind")
    if isinstance(kind, str) and kind:
        return f"a '{kind}' model"
    return "no 'kind' entry" if "kind" not in config else f"'kind': {json.dumps(kind)} (not a model kind)"


def read_folder_weights(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """A model folder's weights, checked against the digest its config.json recorded (when it did)."""
    path = Path(folder) / WEIGHTS_NAME
    tensors = read_weights(path)
    expected = weights_digest(config)
    if expected is not None and not durable.digest_matches(path, expected):
        raise ModelFolderError(f"{path}: its checksum is not the one config.json recorded ({expected[:24]}...): "
                               "the file is damaged or was replaced")
    return tensors


def weights_digest(config: dict) -> Optional[str]:
    """The digest of the weights that a model folder's config.json recorded (``digest``; ``sha256`` in
    earlier exports), or None (hand-made folders)."""
    return durable.recorded_digest({key: value.get(WEIGHTS_NAME) for key, value in config.items()
                                    if key in ("digest", "sha256") and isinstance(value, dict)})


def read_weights(path: str | Path, error: type[Exception] = ModelFolderError) -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else is refused rather than unpickled, and so are
    weights holding NaN or infinity (they would give black images without a word). Problems
    raise ``error`` naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise error(f"{path}: weights file not found")
    if path.suffix != ".safetensors":
        raise error(f"{path}: only .safetensors weights are accepted "
                    "(pickle-based .ckpt/.bin/.pt files can run code when loaded)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise error(f"{path}: not a readable safetensors file ({e})") from None
    broken = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise error(f"{path}: {len(broken)} tensor(s) hold NaN or infinite values, e.g. '{broken[0]}'")
    return tensors


def load_state_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: Path, what: str) -> torch.nn.Module:
    """Strict load with an error that names a few missing / unexpected / mis-shaped keys; ``what`` names
    the model the weights should fit (e.g. "the VAE config")."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        details = []
        if missing:
            details.append(f"{len(missing)} missing: {few(missing)}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
        raise ModelFolderError(f"{where}: weights do not fit {what} ({'; '.join(details)})")
    for key, value in expected.items():
        if sd[key].shape != value.shape:
            raise ModelFolderError(f"{where}: weight '{key}' has shape {tuple(sd[key].shape)}, "
                                   f"{what} needs {tuple(value.shape)}")
    model.load_state_dict(sd, strict=True)
    return model


def find_model_folder(path: str | Path, subfolder: str) -> Path:
    """``path`` itself when it is a model folder, else ``path/subfolder`` (a training output dir)."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file() and not (path / subfolder / CONFIG_NAME).is_file():
        return path
    if (path / subfolder / CONFIG_NAME).is_file():
        return path / subfolder
    if path.is_file():
        return path
    raise ModelFolderError(f"{path}: neither a model folder (config.json + {WEIGHTS_NAME}) nor a training "
                           f"output dir with a '{subfolder}' export")


# ----------------------------------------------------------------------------- the VAE

# VAEConfig fields added after identities were first recorded: left out of the identity while at their
# defaults, so a VAE that could be written before keeps its identity (its caches, runs and exports still match).
LATER_VAE_FIELDS = ("shift_factor", "latents_mean", "latents_std", "use_quant_conv", "use_post_quant_conv")


def vae_identity(model: AutoencoderKL) -> str:
    """SHA-256 over the VAE's config and weights, whatever file format they came from: the key of
    its latent stores, and what a stage-2 checkpoint records of the VAE it was trained with."""
    config, defaults = dataclasses.asdict(model.config), dataclasses.asdict(VAEConfig())
    for name in LATER_VAE_FIELDS:
        if config[name] == defaults[name]:
            del config[name]
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def diffusers_vae_config(cfg: VAEConfig, sample_size: Optional[int] = None) -> Optional[dict]:
    """The diffusers ``AutoencoderKL`` config.json of a VAE of ``cfg`` (our weights are in its key layout), or
    None where diffusers has no such model (wavelet resampling)."""
    if cfg.resample != "conv":
        return None
    levels = len(cfg.channel_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
            "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
            "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.latent_channels,
            "norm_num_groups": cfg.norm_groups, "mid_block_add_attention": cfg.mid_attention,
            "scaling_factor": cfg.scale_factor, "shift_factor": cfg.shift_factor or None,
            "latents_mean": list(cfg.latents_mean) or None, "latents_std": list(cfg.latents_std) or None,
            "use_quant_conv": cfg.use_quant_conv, "use_post_quant_conv": cfg.use_post_quant_conv,
            "force_upcast": True, **({"sample_size": sample_size} if sample_size else {})}


def write_diffusers_folder(folder: Path, config: dict, weights: Path | dict[str, torch.Tensor]) -> None:
    """``folder`` as diffusers' save_pretrained leaves it: config.json + diffusion_pytorch_model.safetensors
    (``weights``: tensors, or a safetensors file already in diffusers' layout, linked rather than copied)."""
    folder.mkdir()
    target = folder / DIFFUSERS_WEIGHTS_NAME
    if isinstance(weights, dict):
        save_file(weights, target)
    else:
        durable.link_or_copy(weights, target)
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def save_vae(model: AutoencoderKL, folder: str | Path, run_config: Optional[dict] = None) -> Path:
    """Write ``folder/config.json`` (kind "vae", the model config, the run config) + ``model.safetensors``, a
    diffusers copy in ``diffusers/`` (the same weights) and the model card."""
    config = {"kind": "vae", "model": dataclasses.asdict(model.config), "run_config": run_config}
    image_size = (run_config or {}).get("data", {}).get("image_size") if isinstance(run_config, dict) else None
    theirs = diffusers_vae_config(model.config, image_size if isinstance(image_size, int) else None)

    def diffusers(tmp: Path, tensors: dict[str, torch.Tensor]) -> Optional[str]:
        if theirs is None:
            return f"model.resample={model.config.resample} has no diffusers counterpart"
        write_diffusers_folder(tmp / DIFFUSERS_FOLDER, theirs, tmp / WEIGHTS_NAME)
        return None
    return save_model_folder(folder, model.state_dict(), config, diffusers)


def vae_config(values: dict, where: Path) -> VAEConfig:
    """A VAE's model config, typed and validated exactly like a command-line config; errors name the file."""
    try:
        return from_dict(VAEConfig, values, str(where), prefix="model.")
    except ConfigError as e:
        raise ModelFolderError(f"{where}: {e}") from None


def load_our_vae(folder: Path, config: dict) -> AutoencoderKL:
    """A VAE exported here (``config.json`` of kind "vae", read as ``config``), in eval mode."""
    cfg = vae_config(config.get("model") or {}, folder / CONFIG_NAME)
    return load_state_strict(AutoencoderKL(cfg), read_folder_weights(folder, config), folder, "the VAE config").eval()


# ----------------------------------------------------------------------------- a stage-2 run's latent normalisation

NORMALIZATION_FIELDS = ("scale_factor", "shift_factor", "latents_mean", "latents_std")
STATISTICS_BATCH = 256


def latent_statistics(store, num_rows: int) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the latents of ``num_rows`` rows of a latent store spread over it (``store[i]``
    rows' posterior ``mean`` and ``std``; flips left out: they do not change per-channel statistics), computed
    exactly from the posteriors: E[z] = E[mean], Var[z] = E[mean^2 + std^2] - E[z]^2, in float64."""
    rows = sorted({round(i * (len(store) - 1) / max(1, num_rows - 1)) for i in range(min(num_rows, len(store)))})
    first = second = None
    count = 0
    for start in range(0, len(rows), STATISTICS_BATCH):
        batch = store.__getitems__(rows[start:start + STATISTICS_BATCH])
        mean, std = batch["mean"].double(), batch["std"].double()
        sums = mean.sum(dim=(0, 2, 3)), (mean.square() + std.square()).sum(dim=(0, 2, 3))
        first, second = sums if first is None else (first + sums[0], second + sums[1])
        count += mean.shape[0] * mean.shape[2] * mean.shape[3]
    centre = first / count
    return centre.tolist(), (second / count - centre.square()).clamp_min(0).sqrt().tolist()


def latent_norm_record(section, vae: AutoencoderKL, store) -> Optional[dict]:
    """The normalisation a stage-2 run's ``latent_norm`` section puts in place of the VAE's own (the VAE config
    fields :data:`NORMALIZATION_FIELDS`), or None (``mode=vae``: the VAE's own). Statistics not given are
    measured over the training latents of ``store``."""
    if section.mode == "vae":
        return None
    channels = vae.config.latent_channels
    if section.mean and len(section.mean) != channels:
        raise ConfigError(f"config key 'latent_norm.mean': {len(section.mean)} values for the VAE's {channels} "
                          "latent channels: give one per channel")
    mean, std = (list(section.mean), list(section.std)) if section.mean else latent_statistics(store, section.rows)
    logger.info("latent_norm=channel: per-channel mean %s, std %s (%s), scale %g", [round(v, 4) for v in mean],
                [round(v, 4) for v in std], "given" if section.mean else f"measured over {section.rows} rows at most",
                section.scale)
    return {"scale_factor": section.scale, "shift_factor": 0.0, "latents_mean": mean, "latents_std": std}


def with_latent_norm(vae: AutoencoderKL, record: Optional[dict], where: Path) -> AutoencoderKL:
    """``vae`` normalising its latents as ``record`` says (:func:`latent_norm_record`; None: as it is): the
    same modules and weights under another config. A record that does not read is one line naming ``where``."""
    if not record:
        return vae
    if not isinstance(record, dict) or set(record) - set(NORMALIZATION_FIELDS):
        raise ModelFolderError(f"{where}: 'latent_norm' must hold {', '.join(NORMALIZATION_FIELDS)}, got {record!r}")
    normalised = copy.copy(vae)
    normalised.config = vae_config({**to_dict(vae.config), **record}, where)
    return normalised


def training_vae(net_folder: str | Path, recorded: dict) -> Path:
    """The VAE the stage-2 export ``net_folder`` was trained with (``recorded``: its config.json's ``vae``
    record): the run's own copy where the record says it is, the copy beside the export when the run was
    moved (``<export>/../frozen_vae``), else the VAE it came from. None there: a one-line error naming the
    places tried. (Its identity is checked by the caller.)"""
    net_folder = Path(net_folder)
    copy, origin = recorded.get("copy"), recorded.get("path")
    beside = net_folder.absolute().parent / FROZEN_VAE
    candidates = [(copy, "the run's copy"), (beside, "the run's copy beside the export"), (origin, "the VAE")]
    tried = []
    for path, what in candidates:
        if not path or not isinstance(path, (str, Path)):
            continue
        path = Path(path)
        if (path / CONFIG_NAME).is_file() or (path / "vae" / CONFIG_NAME).is_file():
            if what != candidates[0][1] and copy:
                logger.info("%s is not at %s (was the run moved?); using %s %s", candidates[0][1], copy, what, path)
            return path
        tried.append(str(path))
    if not tried:
        raise ModelFolderError(f"{net_folder}: records no VAE; pass --vae")
    places = ", ".join(dict.fromkeys(tried))
    raise ModelFolderError(f"{net_folder}: the VAE it was trained with is at none of {places}; pass --vae")


def vae_to_resume_with(given: str, output_dir: Path, resume: Optional[str]) -> str:
    """The VAE a stage-2 run uses: ``given`` (``vae``), or, when a resumed run's VAE is gone (the run was
    moved, or its VAE deleted), the run's own copy (``OUTPUT_DIR/frozen_vae``), saying so."""
    own = Path(output_dir) / FROZEN_VAE
    if resume and given and not Path(given).exists() and (own / CONFIG_NAME).is_file():
        logger.warning("the VAE %s is gone; resuming with the run's own copy %s", given, own)
        return str(own)
    return given


# ----------------------------------------------------------------------------- the stage-2 network

@dataclass
class NetworkExport:
    """What an exported stage-2 folder says about itself."""
    folder: Path
    config: UNetRunConfig      # the resolved run config
    sizes: Sizes               # what the network was built for
    weights: str               # "online", "ema" or "posthoc_ema"
    vae: dict                  # the VAE it was trained with: {"path": ..., "model": {...}}
    text_encoder: Optional[dict] = None   # cond.type=text: modules.interop.clip.TextEncoder.record()


def export_config(cfg: UNetRunConfig, sizes: Sizes, vae: dict, weights: str,
                  text_encoder: Optional[dict] = None) -> dict:
    """``config.json`` of a stage-2 export: the run config and sizes, and a summary of them for a reader's eye."""
    summary = {"model": to_dict(cfg.model), "cond": to_dict(cfg.cond), "objective": cfg.objective,
               cfg.objective: to_dict(cfg.objective_cfg), "latent_size": sizes.latent_size}
    ema = {"ema_decay": cfg.ema.decay} if weights == "ema" else {}
    text = {"text_encoder": text_encoder} if text_encoder is not None else {}
    return {"kind": "unet", "weights": weights, **summary, **ema, "vae": vae, **text, "run_config": to_dict(cfg),
            "sizes": to_dict(sizes)}


def save_network(folder: str | Path, state_dict: dict[str, torch.Tensor], cfg: UNetRunConfig, sizes: Sizes,
                 vae: dict, weights: str, text_encoder: Optional[dict] = None, about: Optional[dict] = None,
                 diffusers: Optional[DiffusersWriter] = None) -> Path:
    """The one way a stage-2 network is exported: its weights, its run config and sizes, its VAE's record
    (and its text encoder's); ``about``: more entries for its config.json (what a post-hoc EMA was made of); its
    model card, and the diffusers copy ``diffusers`` writes (modules/interop/dit.py)."""
    return save_model_folder(folder, state_dict, {**export_config(cfg, sizes, vae, weights, text_encoder),
                                                  **(about or {})}, diffusers)


def read_network_export(folder: str | Path) -> NetworkExport:
    """Read and validate an export's config.json: the run config and the sizes are checked like a
    command-line config, and the summary entries must agree with them (an edited summary is refused)."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    raw = read_config(folder, kind="unet")
    try:
        if not isinstance(raw.get("run_config"), dict):
            raise ConfigError("no 'run_config' entry (the run config the model was trained with)")
        cfg = from_dict(UNetRunConfig, raw["run_config"], str(path))
        recorded = raw["sizes"] if "sizes" in raw else legacy_sizes(raw["run_config"])
        if not isinstance(recorded, dict):
            raise ConfigError(f"'sizes' must be the sizes the network was built for, got {recorded!r}")
        sizes = from_dict(Sizes, recorded, str(path), prefix="sizes.")
        problem = sizes_problem(cfg, sizes)
        if problem:
            raise ConfigError(problem)
    except ConfigError as e:
        raise ModelFolderError(f"{path}: {e}") from None
    weights = raw.get("weights", "ema" if "ema_decay" in raw else "online")   # exports before 2026-12: no entry
    vae = raw.get("vae")
    if not isinstance(vae, dict):
        raise ModelFolderError(f"{path}: 'vae' must be the record of the VAE the model was trained with, "
                               f"got {vae!r}")
    text_encoder = raw.get("text_encoder")
    if cfg.cond.type == "text" and not (isinstance(text_encoder, dict)
                                        and isinstance(text_encoder.get("identity"), str)):
        raise ModelFolderError(f"{path}: 'text_encoder' must be the record of the text encoder the model was "
                               f"trained with (path and identity), got {text_encoder!r}")
    if "sizes" in raw:   # the summary of an earlier export has other entries; its run_config is what is read
        expected = export_config(cfg, sizes, vae, weights, text_encoder if cfg.cond.type == "text" else None)
        summary = {k: v for k, v in expected.items() if k not in ("run_config", "sizes")}   # what is read: above
        # fields added since the export was written read as their defaults, as from_dict reads run_config
        edited = diff_fields(with_defaults({k: raw.get(k) for k in summary}, summary), summary)
        if edited:
            raise ModelFolderError(f"{path}: its entries do not match its run_config ({'; '.join(edited[:3])}); "
                                   "was it edited? Change run_config instead")
    return NetworkExport(folder, cfg, sizes, weights, vae, text_encoder if cfg.cond.type == "text" else None)


def load_network(folder: str | Path, export: Optional[NetworkExport] = None) -> Denoiser:
    """Rebuild the stage-2 network (``model.arch``: UNet or DiT) from an exported folder
    (config.json + model.safetensors), in eval mode."""
    export = export or read_network_export(folder)
    model = build_network(export.config.model, export.config.cond, export.sizes)
    # exports of compiled runs before 2027 hold torch.compile's wrapper's names
    weights = without_compiled_prefix(read_folder_weights(Path(folder), read_config(folder)))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise ModelFolderError(f"{folder}: weights do not match config.json ({e})") from None
    if missing or unexpected:
        raise ModelFolderError(f"{folder}: weights do not match config.json "
                               f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    return model.eval()
