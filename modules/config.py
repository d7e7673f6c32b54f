"""Typed run configurations, presets and dotted ``key=value`` overrides.

A run's configuration is a tree of dataclasses. A preset in ``configs/<stage>/<name>.json``
is a (possibly partial) nested dict merged over the defaults; trailing command-line words
``a.b=value`` are applied last. Every key and value is checked against the dataclass
types, so a typo is an error naming the key instead of a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it."""


# ----------------------------------------------------------------------------- sections

@dataclass
class DataConfig:
    path: str = ""                      # image folder, save_to_disk folder or hub name
    split: str = "train"
    image_size: int = 256
    random_crop_scale: float = 1.0      # < 1 enables random resized crop with this min area
    hflip: bool = True
    vflip: bool = False
    rot90: bool = False
    masks: bool = False                 # load paired masks (cond.type=mask sets this)
    num_val_images: int = 8             # held out for validation PSNR / sample grids
    num_workers: int = 2


@dataclass
class TrainConfig:
    batch_size: int = 8                 # per process, per micro-step
    grad_accum: int = 1
    max_steps: int = 100_000            # optimizer steps
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    lr_schedule: str = "constant"       # constant | cosine | linear
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float = 1.0              # 0 disables
    mixed_precision: str = "auto"       # auto (from accelerate config) | no | fp16 | bf16
    seed: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    image_log_every: int = 1000
    val_every: int = 1000
    max_bad_steps: int = 20             # consecutive non-finite steps before aborting
    process_timeout_s: int = 1800       # collective-op timeout: a dead peer ends the run


@dataclass
class VAEModelConfig:
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    norm_groups: int = 32
    mid_attention: bool = True
    resample: str = "conv"              # conv | wavelet
    scale_factor: float = 1.0           # latent scale, measured after stage 1 (1 / std)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass
class VAELossConfig:
    kl_weight: float = 1e-6
    perceptual_weight: float = 1.0
    perceptual_weights: Optional[str] = None   # local VGG16/LPIPS weights; None disables
    disc_start: int = 50_001
    disc_weight: float = 0.5
    disc_layers: int = 3
    disc_channels: int = 64
    disc_lr: float = 4.5e-6


@dataclass
class VAERunConfig:
    model: VAEModelConfig = field(default_factory=VAEModelConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=4.5e-6, adam_beta1=0.5, adam_beta2=0.9))
    scale_samples: int = 256            # images used to measure the latent scale factor


@dataclass
class UNetModelConfig:
    in_channels: int = 4                # set from the VAE's latent channels
    base_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (4, 5)   # indices into channel_mult
    head_dim: int = 32
    transformer_depth: int = 1
    context_dim: int = 256              # width of cross-attention tokens
    norm_groups: int = 32
    dropout: float = 0.0
    resample: str = "conv"              # conv | wavelet
    num_step_levels: int = 0            # shortcut: log2(denoise_timesteps) + 1 (set by train_unet); 0: none


@dataclass
class CondConfig:
    type: str = "none"                  # none | class | mask
    num_classes: int = 0                # set from the data's class folders
    drop: float = 0.1                   # whole-sample condition dropout (CFG)
    mask_mode: str = "crossattn"        # crossattn | concat | both
    mask_channels: int = 64             # width of the mask encoder
    image_downsample: int = 8           # image px per latent px; set from the VAE


@dataclass
class ShortcutConfig:
    # The flow part uses the finest level log2 M. The paper calls it d = 0, the official code
    # d = 1/M: the same embedding index, queried by the finest bootstrap level's teacher and by
    # M-step sampling either way, so there is nothing to switch.
    denoise_timesteps: int = 128        # M: finest step is 1/M
    bootstrap_fraction: float = 0.25
    teacher_ema_decay: float = 0.95     # 0: the online model is the teacher
    bootstrap_cfg: bool = False
    cfg_scale: float = 1.5              # training guidance scale used with bootstrap_cfg


@dataclass
class FlowConfig:
    time_sampling: str = "uniform"      # uniform | logit_normal


@dataclass
class DDPMConfig:
    num_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = True                 # decay ramps as min(decay, (1 + n) / (10 + n))


@dataclass
class SampleLogConfig:
    steps: tuple[int, ...] = (1, 4, 128)
    num_images: int = 16
    cfg_scale: float = 1.0


@dataclass
class UNetRunConfig:
    objective: str = "shortcut"         # shortcut | flow | ddpm
    vae: str = ""                       # exported VAE folder or train_vae output dir
    model: UNetModelConfig = field(default_factory=UNetModelConfig)
    cond: CondConfig = field(default_factory=CondConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=1e-4, weight_decay=0.1))
    sample: SampleLogConfig = field(default_factory=SampleLogConfig)
    cache_dir: str = ""                 # latent cache; default: <output-dir>/../latent_cache


CHOICES = {
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "train.mixed_precision": ("auto", "no", "fp16", "bf16"),
    "model.resample": ("conv", "wavelet"),
    "objective": ("shortcut", "flow", "ddpm"),
    "cond.type": ("none", "class", "mask"),
    "cond.mask_mode": ("crossattn", "concat", "both"),
    "flow.time_sampling": ("uniform", "logit_normal"),
}


# ----------------------------------------------------------------------------- parsing

def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(key: str, tp: Any, value: Any) -> Any:
    """Convert ``value`` (a JSON value or a command-line string) to ``tp`` or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _parse_scalar(key, inner[0], value)
    if origin is tuple:
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            items = [s for s in (p.strip() for p in text.split(",")) if s]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return tuple(_parse_scalar(key, args[0], v) for v in items)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if not math.isfinite(out):
                raise ValueError
            return out
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(f"config key '{key}': expected {name}, got {value!r}") from None
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def _set(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"unknown config key '{dotted}': '{prefix}' has no sub-keys")
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{dotted}' (valid keys {where}: {', '.join(names)})")
        if i == len(parts) - 1:
            tp = _field_types(type(node))[part]
            if dataclasses.is_dataclass(getattr(node, part)):
                first = dataclasses.fields(getattr(node, part))[0].name
                raise ConfigError(f"config key '{dotted}' is a section; set its fields, e.g. '{dotted}.{first}'")
            setattr(node, part, _parse_scalar(dotted, tp, value))
        else:
            node = getattr(node, part)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_dict(cfg: Any, values: dict) -> Any:
    """Merge a nested dict (a preset or a saved config) into ``cfg``; unknown keys are errors."""
    for key, value in _flatten(values).items():
        _set(cfg, key, value)
    return cfg


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply command-line words ``a.b=value`` in order."""
    for word in overrides:
        if "=" not in word:
            raise ConfigError(f"override '{word}' is not of the form key=value (e.g. train.lr=2e-4)")
        key, value = word.split("=", 1)
        _set(cfg, key.strip(), value.strip())
    return cfg


def resolve_preset(stage: str, name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return path
    preset = CONFIG_DIR / stage / f"{name_or_path}.json"
    if preset.is_file():
        return preset
    known = sorted(p.stem for p in (CONFIG_DIR / stage).glob("*.json"))
    raise ConfigError(f"config '{name_or_path}' is neither a JSON file nor a {stage} preset "
                      f"(presets: {', '.join(known)})")


def load_config(cls, stage: str, name_or_path: Optional[str], overrides: list[str] = ()):
    """Defaults of ``cls``, then the preset or file, then the overrides; validated."""
    cfg = cls()
    if name_or_path:
        path = resolve_preset(stage, name_or_path)
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path}: invalid JSON ({e})") from None
        apply_dict(cfg, values)
    apply_overrides(cfg, list(overrides))
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, values: dict):
    """Rebuild a config saved by :func:`to_dict` (strict: unknown keys are errors)."""
    cfg = cls()
    apply_dict(cfg, values)
    return cfg


def save_json(cfg_or_dict: Any, path: Path) -> None:
    data = cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def diff_fields(a: dict, b: dict, keys: Optional[list[str]] = None) -> list[str]:
    """Dotted keys whose values differ between two config dicts (for mismatch messages)."""
    fa, fb = _flatten(a), _flatten(b)
    names = keys if keys is not None else sorted(set(fa) | set(fb))
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in names
            if _normalise(fa.get(k)) != _normalise(fb.get(k))]


def _normalise(v):
    return list(v) if isinstance(v, tuple) else v


# ----------------------------------------------------------------------------- validation

def _walk(cfg: Any, prefix: str = ""):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key + ".")
        else:
            yield key, value


_NON_NEGATIVE_OK = {"lr_warmup_steps", "weight_decay", "grad_clip", "seed", "disc_start",
                    "kl_weight", "perceptual_weight", "disc_weight", "drop", "num_val_images",
                    "num_workers", "num_classes", "teacher_ema_decay", "dropout", "decay",
                    "cfg_scale", "scale_samples", "image_log_every", "val_every",
                    "num_step_levels", "adam_beta1", "adam_beta2"}


def validate(cfg: Any) -> None:
    """Range and choice checks that do not depend on the data; errors name the key."""
    for key, value in _walk(cfg):
        leaf = key.rsplit(".", 1)[-1]
        for choice_key, allowed in CHOICES.items():
            if key.endswith(choice_key) and allowed and value not in allowed:
                raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")
        numbers = value if isinstance(value, tuple) else (value,)
        for v in numbers:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if v < 0 or (v == 0 and leaf not in _NON_NEGATIVE_OK and not key.endswith("attention_levels")):
                raise ConfigError(f"config key '{key}': must be {'>= 0' if leaf in _NON_NEGATIVE_OK else '> 0'}, got {value!r}")
    model = getattr(cfg, "model", None)
    if isinstance(model, (VAEModelConfig, UNetModelConfig)):
        for c in model.channel_mult:
            if (model.base_channels * c) % model.norm_groups:
                raise ConfigError(f"config key 'model.base_channels': {model.base_channels} x {c} "
                                  f"is not divisible by model.norm_groups={model.norm_groups}")
    if isinstance(cfg, UNetRunConfig):
        m = cfg.shortcut.denoise_timesteps
        if m & (m - 1):
            raise ConfigError(f"config key 'shortcut.denoise_timesteps': must be a power of two, got {m}")
        if not 0 < cfg.shortcut.bootstrap_fraction < 1:
            raise ConfigError("config key 'shortcut.bootstrap_fraction': must be in (0, 1), "
                              f"got {cfg.shortcut.bootstrap_fraction}")
        bad = [lvl for lvl in cfg.model.attention_levels if lvl >= len(cfg.model.channel_mult)]
        if bad:
            raise ConfigError(f"config key 'model.attention_levels': level(s) {bad} do not exist "
                              f"(model.channel_mult has {len(cfg.model.channel_mult)} levels)")
        if cfg.model.base_channels % cfg.model.head_dim:
            raise ConfigError(f"config key 'model.head_dim': {cfg.model.head_dim} does not divide "
                              f"model.base_channels={cfg.model.base_channels}")
        for name in ("decay",):
            if not getattr(cfg.ema, name) < 1:
                raise ConfigError(f"config key 'ema.{name}': must be < 1")
        if not cfg.shortcut.teacher_ema_decay < 1:
            raise ConfigError("config key 'shortcut.teacher_ema_decay': must be < 1")
    if hasattr(cfg, "data") and hasattr(cfg, "model") and isinstance(cfg.model, VAEModelConfig):
        f = cfg.model.downsample_factor
        if cfg.data.image_size % f:
            raise ConfigError(f"config key 'data.image_size': {cfg.data.image_size} is not divisible "
                              f"by the VAE's downsampling factor {f} (len(model.channel_mult) - 1 halvings)")
