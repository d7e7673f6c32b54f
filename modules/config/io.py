"""Building configs: presets, dotted ``key=value`` overrides, saved files, and validation.

A preset in ``configs/<stage>/<name>.json`` (or any JSON file) is a possibly partial nested
dict merged over a dataclass's defaults; trailing command-line words ``a.b=value`` are applied
last. Every key and value is checked against the dataclass types, so a typo is an error naming
the key instead of a silently ignored setting, and :func:`validate` then applies every field's
rules (see :mod:`modules.config.schema`). ``load_config`` and ``from_dict`` are the only ways a
config is built from outside input, and both validate.

A section declared with ``variant`` (the stage-2 ``model``) changes class with its ``arch`` key,
which is applied before the section's other keys wherever it stands. A config class with an
``upgrade`` function reads saved dicts of an earlier layout through it.

Paths (fields that name a file or a folder: :func:`path_keys`) resolve against where they were
given: a relative path on the command line or in a preset against the current directory, one in a
run's saved ``config.json`` against that run's folder (older runs saved them as typed; today's save
them absolute, so a resume from another directory reads the run's own data, VAE and cache). An empty
path is unset, never the current directory; a path of only spaces is refused.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Optional

from modules import durable
from modules.core.settings import fail, field_rules
from modules.errors import ConfigError

VARIANT_KEY = "arch"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
SAVED_CONFIG_NAME = "config.json"     # a run's resolved config, in its output folder
# Field metadata of a path field: "local" (a file or folder) or "hub" (a folder, or a hub data set's name).
PATH_METADATA = "path"
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- parsing

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
            raise fail(key, f"expected a list, got {value!r}")
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
    except (TypeError, ValueError, OverflowError):
        raise fail(key, f"expected {getattr(tp, '__name__', str(tp))}, got {value!r}") from None
    raise fail(key, f"unsupported type {tp}")


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
            if dataclasses.is_dataclass(getattr(node, part)):
                first = dataclasses.fields(getattr(node, part))[0].name
                raise ConfigError(f"config key '{dotted}' is a section; set its fields, e.g. '{dotted}.{first}'")
            setattr(node, part, _parse_scalar(dotted, typing.get_type_hints(type(node))[part], value))
        else:
            node = getattr(node, part)


def _variants(cfg: Any, dotted: str) -> Optional[tuple[Any, str, dict]]:
    """(parent, section name, choices) when ``dotted`` is the ``arch`` key of a variant section, else None."""
    parts = dotted.split(".")
    if len(parts) < 2 or parts[-1] != VARIANT_KEY:
        return None
    node = cfg
    for part in parts[:-2]:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return None
    fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
    section = fields.get(parts[-2])
    choices = section.metadata.get("variants") if section is not None else None
    return (node, parts[-2], choices) if choices else None


# ----------------------------------------------------------------------------- paths

def path_keys(cfg: Any) -> dict[str, str]:
    """Every dotted key of the config ``cfg`` that names a file or folder, with its kind ("local" or "hub"):
    fields declared with ``metadata={"path": kind}`` (``modules.config.schema.path_setting``), and the keys a
    config class lists in ``other_paths`` (fields of sections declared in core/, which knows no files)."""
    keys: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
            elif f.metadata.get(PATH_METADATA):
                keys[f"{prefix}{f.name}"] = f.metadata[PATH_METADATA]
    walk(cfg, "")
    keys.update({key: "local" for key in getattr(type(cfg), "other_paths", ())})
    return keys


def looks_like_path(text: str) -> bool:
    """Whether ``text`` can only be a path, not a hub data set's name."""
    return os.path.isabs(text) or text.startswith((".", "~")) or text.endswith(("/", os.sep))


def resolve_path(key: str, value: Any, base: Path, kind: str = "local", saved: bool = False) -> Any:
    """``value`` of the path field ``key`` made absolute against ``base``. Unset (None or "") stays unset: an
    empty path is not the current directory; only spaces are refused. A "hub" field's value that is no
    folder under ``base`` and cannot only be a path is a hub data set's name, kept as it is; ``saved``
    (``base`` is a run folder, the value was read from its config.json): such a name that is a folder
    of the current directory is refused rather than read from there."""
    if value is None or value == "":
        return value
    if not isinstance(value, str) or not value.strip():
        raise fail(key, f"{value!r} is not a path (an empty path is unset: give \"\" or a file or folder)")
    path = Path(value).expanduser()
    if path.is_absolute():
        return os.path.normpath(path)
    resolved = os.path.normpath(Path(base).absolute() / path)
    if kind == "hub" and not os.path.exists(resolved) and not looks_like_path(value):
        if saved and os.path.exists(value):
            raise fail(key, f"{value!r} in {Path(base) / SAVED_CONFIG_NAME} is relative: it is read against the "
                       f"run's folder {base}, where it does not exist, and never against the current directory "
                       f"(which holds a {value!r}); pass the data again (--data)")
        return value
    return resolved


def _resolve_paths(cfg: Any, keys: list[str], base: Optional[Path], saved: bool = False) -> list[str]:
    """Resolve the path fields among ``keys`` against ``base`` (None: leave them as read); returns
    ``key=value`` of the relative ones resolved."""
    if base is None:
        return []
    paths = path_keys(cfg)
    resolved = []
    for key in keys:
        if key not in paths:
            continue
        *parents, name = key.split(".")
        node = cfg
        for part in parents:
            node = getattr(node, part)
        value = getattr(node, name)
        new = resolve_path(key, value, base, paths[key], saved)
        if new != value:
            if isinstance(value, str) and not Path(value).expanduser().is_absolute():
                resolved.append(f"{key}={value} -> {new}")
            setattr(node, name, new)
    return resolved


# ----------------------------------------------------------------------------- applying

def _apply(cfg: Any, items: list[tuple[str, Any]]) -> None:
    """Set dotted keys in order, after the ``arch`` keys of variant sections (they choose the section's class)."""
    rest = []
    for key, value in items:
        variants = _variants(cfg, key)
        if variants is None:
            rest.append((key, value))
            continue
        parent, name, choices = variants
        chosen = _parse_scalar(key, str, value)
        if chosen not in choices:
            raise fail(key, f"{chosen!r} is not one of {', '.join(choices)}")
        if type(getattr(parent, name)) is not choices[chosen]:
            setattr(parent, name, choices[chosen]())
    for key, value in rest:
        _set(cfg, key, value)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply_dict(cfg: Any, values: dict, source: str = "config", base: Optional[Path] = None,
               saved: bool = False) -> Any:
    """Merge a nested dict (a preset or a saved config) into ``cfg``; unknown keys are errors. ``base``: the
    folder its relative paths resolve against (None: paths stay as read); ``saved``: it is a run's saved
    config, ``base`` its run folder (relative paths there are logged: runs before 2027 saved them so)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a JSON object of config sections, got {type(values).__name__}")
    upgrade = getattr(type(cfg), "upgrade", None)
    items = list(_flatten(upgrade(values) if upgrade else values).items())
    _apply(cfg, items)
    resolved = _resolve_paths(cfg, [key for key, _ in items], base, saved)
    if resolved and saved:
        logger.warning("%s holds relative paths (saved by an older version); they are read against the run's folder "
                       "%s, not the current directory: %s", source, base, "; ".join(resolved))
    return cfg


def apply_overrides(cfg: Any, overrides: list[str], base: Optional[Path] = None) -> Any:
    """Apply command-line words ``a.b=value`` in order; relative paths resolve against ``base`` (None: they
    stay as typed; :func:`load_config` passes the current directory)."""
    items = []
    for word in overrides:
        if "=" not in word:
            raise ConfigError(f"override '{word}' is not of the form key=value (e.g. train.lr=2e-4)")
        key, value = word.split("=", 1)
        items.append((key.strip(), value.strip()))
    _apply(cfg, items)
    _resolve_paths(cfg, [key for key, _ in items], base)
    return cfg


# ----------------------------------------------------------------------------- validation

def validate(cfg: Any, prefix: str = "") -> Any:
    """Every field's rules, then each section's ``check``, depth first; errors name the key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, key + ".")
            continue
        for rule in field_rules(f):
            problem = rule(value)
            if problem:
                raise fail(key, problem)
    if hasattr(cfg, "check"):
        cfg.check(prefix)
    return cfg


# ----------------------------------------------------------------------------- files

def read_json(path: Path, error=ConfigError) -> Any:
    """A JSON file's value; unreadable, non-UTF-8 or invalid files raise ``error`` naming the file."""
    try:
        return durable.read_json(path)
    except ValueError as e:
        raise error(f"{path}: {e}") from None


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


def saved_run_folder(path: Path) -> Optional[Path]:
    """The run folder whose saved config ``path`` is (a ``config.json`` in a training output folder), or None."""
    folder = Path(path).absolute().parent
    if Path(path).name == SAVED_CONFIG_NAME and durable.output_kind(folder) == "run":
        return folder
    return None


def load_config(cls, stage: str, name_or_path: Optional[str], overrides: list[str] = (),
                run_folder: Optional[Path] = None):
    """Defaults of ``cls``, then the preset or file, then the overrides; validated. Relative paths are made
    absolute: a file's against the current directory, or, for a run's saved config (``run_folder``, or a
    ``config.json`` in a training output folder), against its run folder; the overrides' against the
    current directory."""
    cfg = cls()
    cwd = Path.cwd()
    if name_or_path:
        path = resolve_preset(stage, name_or_path)
        run = Path(run_folder).absolute() if run_folder is not None else saved_run_folder(path)
        apply_dict(cfg, read_json(path), str(path), base=run or cwd, saved=run is not None)
    apply_overrides(cfg, list(overrides), base=cwd)
    return validate(cfg)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, values: dict, source: str = "config", prefix: str = ""):
    """Rebuild a config saved by :func:`to_dict` (strict: unknown keys are errors), validated.

    ``prefix`` is where the section sits in a run config (``"model."``), for the error messages.
    """
    return validate(apply_dict(cls(), values, source), prefix)


def save_json(cfg_or_dict: Any, path: Path) -> None:
    """Write a config (or any JSON-able dict) atomically: a reader never sees half a file."""
    durable.write_json(path, cfg_or_dict if isinstance(cfg_or_dict, dict) else to_dict(cfg_or_dict))


def diff_fields(a: dict, b: dict, keys: Optional[list[str]] = None) -> list[str]:
    """Dotted keys whose values differ between two config dicts (for mismatch messages)."""
    fa, fb = _flatten(a), _flatten(b)
    names = keys if keys is not None else sorted(set(fa) | set(fb))
    return [f"{k}: {fa.get(k)!r} != {fb.get(k)!r}" for k in names
            if _normalise(fa.get(k)) != _normalise(fb.get(k))]


def with_defaults(values: Any, defaults: Any) -> Any:
    """A saved config dict with the keys it lacks taken from ``defaults``, at every depth: a config
    saved before a field existed reads as if it had held the field's default."""
    if not isinstance(values, dict) or not isinstance(defaults, dict):
        return values
    return {**defaults, **{k: with_defaults(v, defaults.get(k)) for k, v in values.items()}}


def _normalise(v):
    return list(v) if isinstance(v, tuple) else v


def changes_in(saved: dict, new: dict, sections: tuple[str, ...]) -> list[str]:
    """Differences between two config dicts inside the given (dotted) sections or keys."""
    return [line for line in diff_fields(saved, new)
            if any(line.startswith(f"{s}.") or line.startswith(f"{s}:") for s in sections)]
