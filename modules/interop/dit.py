"""Pretrained DiT weights into ours (``init_from``), and ours out to diffusers (exports).

    train_unet.py --config dit-xl ... init_from=path/to/DiT-XL-2-256     # a diffusers folder
    train_unet.py --config dit-xl ... init_from=DiT-XL-2-256x256.pt       # the DiT/SiT/REPA code's state dict

The papers' ``.pt`` files are read with ``torch.load(weights_only=True)`` (:func:`read_state_dict`: no code in
them runs) and mapped from the official DiT layout (:data:`OFFICIAL_KEYS`; SiT and REPA keep it, the MeanFlow
PyTorch code adds ``r_embedder``, its interval embedder). They feed the time embedder the raw time: DiT's
timestep in [0, 999] is ours ``1000 t``; SiT and REPA were trained on t in [0, 1] itself (and SiT with t = 1
the data), so they start a run as a network, not as a sampler of ours.

Keys, diffusers -> ours (``i`` a block):
    pos_embed.proj                                     -> patch_embed
    transformer_blocks.0.norm1.emb.timestep_embedder.linear_1 / linear_2 -> time_mlp.0 / time_mlp.2
    transformer_blocks.0.norm1.emb.class_embedder.embedding_table        -> conditioner.label_emb
    transformer_blocks.i.norm1.linear                  -> blocks.i.modulation
    transformer_blocks.i.attn1.to_q, to_k, to_v        -> blocks.i.attn.qkv (stacked: q, k, v)
    transformer_blocks.i.attn1.to_out.0                -> blocks.i.attn.out
    transformer_blocks.i.ff.net.0.proj / ff.net.2      -> blocks.i.fc1 / blocks.i.fc2
    proj_out_1 / proj_out_2                            -> final_modulation / final_proj
diffusers gives every block its own copy of the time and class embedders (``norm1.emb``; equal in
converted official checkpoints) and feeds the final layer from block 0's: block 0's copy is
taken, and differing copies are refused (ours has one conditioning vector). Learned-sigma
checkpoints (``out_channels = 2 x in_channels``) keep the mean half of ``proj_out_2``.

What is not in a diffusers DiT starts so that the converted model computes the same function:
the step-size embedding at zero (a class-conditional DiT can be fine-tuned into a shortcut
model), an unconditional or mask model's time MLP bias absorbs the null label's embedding, and
a mask model's extra input channels get zero patch weights. Two numerical details of diffusers'
DiT differ from the DiT code it was converted from: its time sinusoid spacing
(``model.time_freq_shift=1`` reproduces it; the weights were trained with 0, the default) and
the MLP LayerNorm's eps (1e-5 instead of 1e-6; ours keeps 1e-6, a relative difference of ~1e-6). At a
latent size other than its ``sample_size`` diffusers rescales the position grid; ours does not.
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Optional

import torch

from modules.config.io import read_json
from modules.config.schema import UNetRunConfig
from modules.core.networks.denoiser import Sizes
from modules.errors import ModelFolderError
from modules.core.compiling import without_compiled_prefix
from modules.core.networks.dit import NORM_EPS, dit_positions
from modules.run.export import (CONFIG_NAME, DIFFUSERS_FOLDER, DIFFUSERS_WEIGHTS_NAME, DiffusersWriter,
                                load_state_strict, read_weights, write_diffusers_folder)

logger = logging.getLogger(__name__)

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")   # the latter: DiT pipelines before diffusers 0.28
EMBEDDER = "transformer_blocks.{}.norm1.emb."
# Parts of our DiT that a diffusers DiT does not have: they keep their fresh initialisation.
NEW_PARTS = ("level_emb.", "guidance_emb.", "conditioner.encoder.", "conditioner.to_concat.",
             "conditioner.null_channels", "conditioner.text_pool.", "conditioner.null_text")


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Where training scripts keep the weights in a checkpoint dict: the EMA first, as the DiT code's find_model does.
CHECKPOINT_ENTRIES = ("ema", "model", "state_dict", "module")
MAX_NESTING = 3


def _load_failure(error: Exception) -> str:
    """The line of torch.load's refusal that names what it refused (its message is a page of advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\. |\.?\n|\.?$)", text, re.DOTALL)
    if found and found.group(1).strip():
        return found.group(1).strip()[:200]
    return next((s.strip() for s in text.splitlines() if s.strip()), type(error).__name__)[:200]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or of a pickled checkpoint read with ``torch.load(weights_only=True)``:
    only tensors, plain containers and ``argparse.Namespace`` (the ``args`` training scripts save) are rebuilt,
    so no code in the file runs. A training checkpoint (``{"model", "ema", "opt", "args"}``) gives its EMA
    weights, else its model's; DDP's ``module.`` and torch.compile's prefixes are removed. Anything else is one
    line naming the file."""
    if path.suffix == ".safetensors":
        return read_weights(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise ModelFolderError(f"init_from {path}: expected a .safetensors or a .pt/.pth/.bin/.ckpt state dict")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:    # files of the legacy (non-zip) format cannot be memory-mapped
                if "mmap" not in str(e):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for a disallowed object, and whatever a damaged archive raises
        raise ModelFolderError(f"init_from {path}: not a plain state dict of tensors (torch.load(weights_only=True) "
                               f"refused it, so none of it ran: {_load_failure(e)})") from None
    for _ in range(MAX_NESTING):
        if not isinstance(loaded, dict) or all(isinstance(v, torch.Tensor) for v in loaded.values()):
            break
        entry = next((k for k in CHECKPOINT_ENTRIES if isinstance(loaded.get(k), dict)), None)
        if entry is None:
            break
        loaded = loaded[entry]
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                             for k, v in loaded.items()):
        keys = sorted(map(str, loaded))[:6] if isinstance(loaded, dict) else type(loaded).__name__
        raise ModelFolderError(f"init_from {path}: not a state dict of tensors (found {keys}; a training checkpoint "
                               f"keeps them under one of {', '.join(CHECKPOINT_ENTRIES)})")
    sd = without_compiled_prefix(loaded)
    if all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    broken = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ModelFolderError(f"init_from {path}: {len(broken)} tensor(s) hold NaN or infinite values, e.g. "
                               f"'{broken[0]}'")
    return sd


def read_diffusers_dit(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """``(config, weights, weights file)`` of a diffusers DiT: its folder, a pipeline folder holding
    ``transformer/``, or its ``.safetensors`` file with ``config.json`` beside it."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"init_from {path}: does not exist (expected a diffusers DiTTransformer2DModel "
                               "folder or its .safetensors file)")
    if path.is_file():
        folder, weights = path.parent, path
    else:
        folder = path / "transformer" if (path / "transformer" / CONFIG_NAME).is_file() else path
        found = [folder / name for name in (DIFFUSERS_WEIGHTS_NAME, "diffusion_pytorch_model.bin")
                 if (folder / name).is_file()]
        if not found:
            raise ModelFolderError(f"init_from {folder}: no {DIFFUSERS_WEIGHTS_NAME} (expected a diffusers "
                                   "DiTTransformer2DModel folder)")
        weights = found[0]
    if not (folder / CONFIG_NAME).is_file():
        raise ModelFolderError(f"init_from {folder}: no {CONFIG_NAME} beside the weights (diffusers' model config)")
    config = read_json(folder / CONFIG_NAME, ModelFolderError)
    if not isinstance(config, dict) or config.get("_class_name") not in DIFFUSERS_CLASSES \
            or config.get("norm_type") != "ada_norm_zero" or not config.get("patch_size"):
        name = config.get("_class_name") if isinstance(config, dict) else None
        raise ModelFolderError(f"init_from {folder / CONFIG_NAME}: describes {name or 'an unknown model'}, not a "
                               "diffusers DiT (DiTTransformer2DModel, norm_type ada_norm_zero)")
    return typed_config(config, folder / CONFIG_NAME), read_state_dict(weights), weights


# The diffusers DiT config fields read here: (type, diffusers' default, what else it must be). Every one is
# checked before it is used (a file's field types are never trusted: rule 5); sizes are bounded far above
# any DiT (DiT-XL: 28 layers of 16 heads x 72, 1000 classes).
_SIZE = 1 << 20
DIFFUSERS_FIELDS: dict[str, tuple[type, object, tuple]] = {
    "patch_size": (int, None, (1, 256)),
    "in_channels": (int, 4, (1, 4096)),
    "out_channels": (int, None, (1, 8192)),                 # None: in_channels
    "num_attention_heads": (int, 16, (1, 4096)),
    "attention_head_dim": (int, 72, (1, _SIZE)),
    "num_layers": (int, 28, (1, 4096)),
    "num_embeds_ada_norm": (int, 1000, (1, _SIZE)),
    "sample_size": (int, None, (1, _SIZE)),
    "norm_eps": (float, 1e-5, (1e-5, 1e-6)),               # the two values supported
    "activation_fn": (str, "gelu-approximate", ("gelu-approximate",)),
    "attention_bias": (bool, True, (True,)),
    "norm_elementwise_affine": (bool, False, (False,)),
}
_OPTIONAL = ("out_channels", "sample_size")


def typed_config(config: dict, path: Path) -> dict:
    """The fields of a diffusers DiT ``config`` this module reads (:data:`DIFFUSERS_FIELDS`), checked: type,
    range or supported value; absent ones at diffusers' defaults. A field that fails is one line naming it."""
    out = dict(config)
    for field, (kind, default, allowed) in DIFFUSERS_FIELDS.items():
        value = config.get(field, default)

        def refuse(why: str):
            raise ModelFolderError(f"init_from {path}: diffusers config field '{field}' = {value!r}: {why}")

        if value is None and field in _OPTIONAL:
            out[field] = None
            continue
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool):
                refuse("must be an integer")
            low, high = allowed
            if not low <= value <= high:
                refuse(f"must be between {low} and {high}")
        elif kind is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                refuse("must be a number")
            if value not in allowed:
                refuse("only 1e-5 (diffusers' default) or 1e-6 (the DiT code's) is supported")
        elif type(value) is not kind or value not in allowed:
            refuse(f"only {allowed[0]!r} is supported")
        out[field] = value
    in_channels = out["in_channels"]
    if out["out_channels"] not in (None, in_channels, 2 * in_channels):
        value = out["out_channels"]
        raise ModelFolderError(f"init_from {path}: diffusers config field 'out_channels' = {value!r}: must be "
                               f"in_channels ({in_channels}) or twice that (learned sigma)")
    return out


def dit_fields(config: dict, weights: dict[str, torch.Tensor], where: Path) -> dict[str, object]:
    """The config fields of ours that a diffusers DiT (its config checked by :func:`typed_config`) fixes, keyed
    by their dotted names."""
    in_channels = config["in_channels"]
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    fc1 = weights.get("transformer_blocks.0.ff.net.0.proj.weight")
    if fc1 is None or fc1.ndim != 2:
        raise ModelFolderError(f"init_from {where}: no 2-D 'transformer_blocks.0.ff.net.0.proj.weight': "
                               "not a diffusers DiT's weights")
    mlp_hidden = fc1.shape[0]
    return {"latent channels": in_channels, "model.hidden_size": hidden,
            "model.depth": config["num_layers"], "model.num_heads": config["num_attention_heads"],
            "model.patch_size": config["patch_size"], "model.mlp_ratio": mlp_hidden / hidden,
            "classes": config["num_embeds_ada_norm"]}


def convert_diffusers_dit(weights: dict[str, torch.Tensor], config: dict, where: Path) -> dict[str, torch.Tensor]:
    """A diffusers DiT state dict in our key layout (the module docstring has the map)."""
    sd = dict(weights)
    depth = config["num_layers"]
    shared = {k.removeprefix(EMBEDDER.format(0)): v for k, v in sd.items() if k.startswith(EMBEDDER.format(0))}
    for i in range(depth):
        prefix = EMBEDDER.format(i)
        copy = {k.removeprefix(prefix): sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]}
        differs = [k for k in sorted(shared.keys() | copy.keys())
                   if k not in copy or k not in shared or not torch.equal(copy[k], shared[k])]
        if differs:
            raise ModelFolderError(f"init_from {where}: block {i}'s time/class embedder differs from block 0's "
                                   f"('{prefix}{differs[0]}'); ours has one conditioning vector, so only "
                                   "checkpoints whose blocks share it convert")
    renames = {"pos_embed.proj.": "patch_embed.", "proj_out_1.": "final_modulation.", "proj_out_2.": "final_proj."}
    out = {}
    for name, value in [("time_mlp.0.", "timestep_embedder.linear_1."), ("time_mlp.2.", "timestep_embedder.linear_2."),
                        ("conditioner.label_emb.", "class_embedder.embedding_table.")]:
        out.update({name + k.removeprefix(value): v for k, v in shared.items() if k.startswith(value)})
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        for theirs, ours in (("norm1.linear.", "modulation."), ("attn1.to_out.0.", "attn.out."),
                             ("ff.net.0.proj.", "fc1."), ("ff.net.2.", "fc2.")):
            renames[block + theirs] = f"blocks.{i}.{ours}"
        for kind in ("weight", "bias"):
            parts = [sd.pop(f"{block}attn1.to_{x}.{kind}", None) for x in "qkv"]
            if all(p is not None for p in parts):
                out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(parts)
    for key, value in sd.items():
        prefix = next((p for p in renames if key.startswith(p)), None)
        out[renames[prefix] + key.removeprefix(prefix) if prefix else key] = value
    channels, p = config["in_channels"], config["patch_size"]
    if config.get("out_channels") == 2 * channels:
        # Output features are (patch row, patch column, channel), channel fastest: keep the mean channels.
        for kind in ("weight", "bias"):
            value = out[f"final_proj.{kind}"]
            out[f"final_proj.{kind}"] = value.reshape(p, p, 2 * channels, -1)[:, :, :channels].reshape(
                p * p * channels, *value.shape[1:])
    return out


# ----------------------------------------------------------------------------- the papers' checkpoints

# The official DiT code's keys (SiT and REPA keep them; the MeanFlow PyTorch code adds r_embedder) -> ours.
OFFICIAL_KEYS = [
    (r"x_embedder\.proj\.(weight|bias)", r"patch_embed.\1"),
    (r"t_embedder\.mlp\.([02])\.(weight|bias)", r"time_mlp.\1.\2"),
    (r"r_embedder\.mlp\.([02])\.(weight|bias)", r"level_emb.mlp.\1.\2"),     # MeanFlow's interval t - r
    (r"y_embedder\.embedding_table\.weight", "conditioner.label_emb.weight"),
    (r"blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)", r"blocks.\1.modulation.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.attn.out.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"final_layer\.adaLN_modulation\.1\.(weight|bias)", r"final_modulation.\1"),
    (r"final_layer\.linear\.(weight|bias)", r"final_proj.\1"),
]
OFFICIAL_MARKER = "x_embedder.proj.weight"
# Kept out: REPA's projection heads (its training loss's, not the network's); the fixed positions (checked).
OFFICIAL_DROPPED = ("projectors.",)
# The DiT paper's widths and their head counts (a state dict does not record heads): S, B, L, XL.
PAPER_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}


def is_official_layout(sd: dict[str, torch.Tensor]) -> bool:
    return OFFICIAL_MARKER in sd


def convert_official_dit(sd: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """An official-layout DiT/SiT/REPA/MeanFlow state dict in our layout, and the fields it fixes
    (:func:`dit_fields`'s keys; heads from the paper's table). A key of another layout is one line naming it."""
    out, dropped = {}, []
    for key, value in sd.items():
        if key == "pos_embed" or key.startswith(OFFICIAL_DROPPED):
            dropped.append(key)
            continue
        for pattern, ours in OFFICIAL_KEYS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, ours, key)] = value
                break
        else:
            raise ModelFolderError(f"init_from {where}: key '{key}' is not one of the DiT/SiT/REPA/MeanFlow "
                                   "layout's (x_embedder, t_embedder, r_embedder, y_embedder, blocks.<i>.{adaLN_"
                                   "modulation, attn.qkv, attn.proj, mlp.fc1, mlp.fc2}, final_layer, pos_embed, "
                                   "projectors): another architecture")
    if dropped and any(k.startswith(OFFICIAL_DROPPED) for k in dropped):
        logger.info("init_from %s: REPA's projection heads (projectors.*) are its training loss's, not loaded", where)
    patch = out["patch_embed.weight"]
    hidden, channels, p = patch.shape[0], patch.shape[1], patch.shape[2]
    fc1 = out.get("blocks.0.fc1.weight")
    table = out.get("conditioner.label_emb.weight")
    if fc1 is None or table is None or "final_proj.weight" not in out:
        missing = "blocks.0.mlp.fc1.weight" if fc1 is None else "y_embedder.embedding_table.weight" \
            if table is None else "final_layer.linear.weight"
        raise ModelFolderError(f"init_from {where}: no '{missing}': not a whole DiT/SiT state dict")
    fields = {"latent channels": channels, "model.hidden_size": hidden,
              "model.depth": 1 + max(int(k.split(".")[1]) for k in out if k.startswith("blocks.")),
              "model.patch_size": p, "model.mlp_ratio": fc1.shape[0] / hidden,
              "classes": table.shape[0] - 1}          # the last row: the null label (class dropout)
    if hidden in PAPER_HEADS:
        fields["model.num_heads"] = PAPER_HEADS[hidden]
    outputs = out["final_proj.weight"].shape[0]
    if outputs == 2 * p * p * channels:      # learned sigma (DiT, SiT): keep the mean channels
        for kind in ("weight", "bias"):
            value = out[f"final_proj.{kind}"]
            out[f"final_proj.{kind}"] = value.reshape(p, p, 2 * channels, -1)[:, :, :channels].reshape(
                p * p * channels, *value.shape[1:])
    elif outputs != p * p * channels:
        raise ModelFolderError(f"init_from {where}: 'final_layer.linear.weight' has {outputs} outputs, not "
                               f"{p * p * channels} ({p}x{p} patches of {channels} channels) or twice that")
    return out, fields


def check_positions(sd: dict[str, torch.Tensor], where: Path, sizes: Sizes, patch: int) -> None:
    """An official checkpoint's saved ``pos_embed`` must be the fixed sine-cosine code ours computes (for the
    grid it was made for; another grid than this run's is a warning, as diffusers' sample_size)."""
    saved = sd.get("pos_embed")
    if saved is None:
        return
    tokens, dim = saved.shape[-2], saved.shape[-1]
    grid = round(tokens ** 0.5)
    ours = dit_positions(grid, grid, dim, torch.device("cpu"), torch.float64)
    if grid * grid != tokens or not torch.allclose(saved.reshape(tokens, dim).double(), ours, atol=1e-3, rtol=0):
        raise ModelFolderError(f"init_from {where}: its 'pos_embed' is not the fixed 2-D sine-cosine code of a "
                               f"square grid: another architecture")
    run_grid = sizes.latent_size // patch
    if grid != run_grid:
        logger.warning("init_from %s was made for %dx%d tokens, this run has %dx%d (the positions follow the grid)",
                       where, grid, grid, run_grid, run_grid)


def read_init_source(path: Path, sizes: Sizes, patch: int) -> tuple[dict[str, torch.Tensor], dict, Path]:
    """``(state dict in our layout, the fields it fixes, where)`` of ``init_from``: a diffusers DiT (folder, or
    its weights with config.json beside) or an official-layout state dict (.pt/.pth/.bin/.ckpt read with
    weights_only, or .safetensors)."""
    if path.is_file():
        raw = read_state_dict(path)
        if is_official_layout(raw):
            check_positions(raw, path, sizes, patch)
            sd, fields = convert_official_dit(raw, path)
            return sd, fields, path
        if not (path.parent / CONFIG_NAME).is_file():
            first = next(iter(raw), "")
            raise ModelFolderError(f"init_from {path}: neither the official DiT layout (no '{OFFICIAL_MARKER}'; its "
                                   f"first key is '{first}') nor a diffusers DiT (no {CONFIG_NAME} beside it)")
    config, weights, where = read_diffusers_dit(path)
    fields = dit_fields(config, weights, where)
    if config.get("sample_size") not in (None, sizes.latent_size):
        logger.warning("init_from %s was made for %sx%s latents, this run has %dx%d: diffusers would rescale the "
                       "position codes to its own grid, ours keeps the DiT code's unscaled grid", where,
                       config["sample_size"], config["sample_size"], sizes.latent_size, sizes.latent_size)
    return convert_diffusers_dit(weights, config, where), fields, where


def load_init_weights(model: torch.nn.Module, cfg: UNetRunConfig, sizes: Sizes) -> None:
    """Load ``cfg.init_from`` (a diffusers DiT, or the DiT/SiT/REPA/MeanFlow code's state dict) into the freshly
    built DiT ``model`` (built for ``sizes``); anything that does not fit is one line naming the config key, or the
    size and where it comes from."""
    sd, fields, where = read_init_source(Path(cfg.init_from), sizes, cfg.model.patch_size)
    ours = {"model.hidden_size": cfg.model.hidden_size, "model.depth": cfg.model.depth,
            "model.num_heads": cfg.model.num_heads, "model.patch_size": cfg.model.patch_size,
            "model.mlp_ratio": cfg.model.mlp_ratio}
    for key, value in ours.items():
        if fields.get(key, value) != value:
            raise ModelFolderError(f"init_from {where}: the checkpoint has {key}={fields[key]}, this run "
                                   f"{key}={value}: set {key}={fields[key]} or start from another DiT")
    derived = {"latent channels": (sizes.latent_channels, "the VAE's")}
    if cfg.cond.type == "class":
        derived["classes"] = (sizes.num_classes, "the data's")
    for what, (value, origin) in derived.items():
        if fields[what] != value:
            raise ModelFolderError(f"init_from {where}: the checkpoint has {fields[what]} {what}, this run "
                                   f"{value} ({origin}): start from a DiT made for them")
    fresh = model.state_dict()
    foreign = next((k for k in sd if k.startswith("level_emb.") and k not in fresh), None)
    if foreign:
        raise ModelFolderError(f"init_from {where}: it embeds MeanFlow's interval (r_embedder), this run's network "
                               f"has no such input ('{foreign}'): objective=meanflow has")
    if cfg.cond.type != "class":
        # No label embedding here: the null label's vector moves into the time MLP's output bias.
        table = sd.pop("conditioner.label_emb.weight")
        sd["time_mlp.2.bias"] = sd["time_mlp.2.bias"] + table[fields["classes"]]
    if "conditioner.to_concat.weight" in fresh:
        # The mask's input channels start with zero weights: the same function until they learn.
        weight = sd["patch_embed.weight"]
        extra = fresh["patch_embed.weight"].shape[1] - weight.shape[1]
        sd["patch_embed.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], extra, *weight.shape[2:])], 1)
    # text's cross-attention and pooling start at zero output: the same function until they learn
    new = [k for k in fresh if (k.startswith(NEW_PARTS) or ".cross_attn." in k) and k not in sd]
    sd.update({k: fresh[k] for k in new})
    load_state_strict(model, sd, where, f"this run's DiT (init_from={cfg.init_from})")
    logger.info("init_from: %d tensors from %s (%d blocks, %d classes); initialised fresh: %s", len(sd) - len(new),
                where, fields["model.depth"], fields["classes"],
                ", ".join(sorted({k.rsplit(".", 1)[0] for k in new})) or "nothing")


# ----------------------------------------------------------------------------- ours -> diffusers (exports)

def diffusers_dit_problem(cfg: UNetRunConfig, sizes: Sizes) -> Optional[str]:
    """Why a stage-2 network of ``cfg`` (built for ``sizes``) has no ``DiTTransformer2DModel`` computing its
    function, or None."""
    inputs = sizes.inputs
    if cfg.model.arch != "dit":
        return f"model.arch={cfg.model.arch}: diffusers' DiTTransformer2DModel is a DiT"
    if inputs.step != "none":
        what = {"level": "a step-size level input (shortcut levels)", "interval": "an interval input (MeanFlow)"}
        return f"objective={cfg.objective} gives the network {what.get(inputs.step, inputs.step)}, which it has not"
    if inputs.guidance or inputs.guidance_interval or inputs.velocity_head:
        return f"objective={cfg.objective} gives the network a guidance input or a second head, which it has not"
    if cfg.cond.type not in ("class", "none"):
        return f"cond.type={cfg.cond.type}: it takes class labels only (no text, no masks)"
    if cfg.model.time_freq_shift != 1:
        return ("model.time_freq_shift=0 (the DiT code's time sinusoid): it embeds time with spacing 1; train with "
                "model.time_freq_shift=1 to export")
    if int(cfg.model.hidden_size * cfg.model.mlp_ratio) != 4 * cfg.model.hidden_size:
        return f"model.mlp_ratio={cfg.model.mlp_ratio}: its MLP is 4 x the width"
    return None


def to_diffusers_dit(sd: dict[str, torch.Tensor], cfg: UNetRunConfig, sizes: Sizes) -> tuple[dict, dict]:
    """``(config.json, weights)`` of the ``DiTTransformer2DModel`` computing our DiT's function (``sd``: its
    state dict; :func:`diffusers_dit_problem` None): the module docstring's map, read right to left, with
    the time and class embedders copied into every block. An unconditional model gets one label whose
    embedding is zero (pass label 0)."""
    m, depth = cfg.model, cfg.model.depth
    classes = sizes.num_classes if cfg.cond.type == "class" else 1
    table = sd["conditioner.label_emb.weight"] if cfg.cond.type == "class" else \
        sd["time_mlp.2.bias"].new_zeros(classes + 1, m.hidden_size)
    out = {"pos_embed.proj.weight": sd["patch_embed.weight"], "pos_embed.proj.bias": sd["patch_embed.bias"]}
    for ours, theirs in (("final_modulation.", "proj_out_1."), ("final_proj.", "proj_out_2.")):
        for kind in ("weight", "bias"):
            out[theirs + kind] = sd[ours + kind]
    for i in range(depth):
        emb, block = EMBEDDER.format(i), f"transformer_blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{emb}timestep_embedder.linear_1.{kind}"] = sd[f"time_mlp.0.{kind}"]
            out[f"{emb}timestep_embedder.linear_2.{kind}"] = sd[f"time_mlp.2.{kind}"]
            for ours, theirs in (("modulation.", "norm1.linear."), ("attn.out.", "attn1.to_out.0."),
                                 ("fc1.", "ff.net.0.proj."), ("fc2.", "ff.net.2.")):
                out[block + theirs + kind] = sd[f"blocks.{i}.{ours}{kind}"]
            for name, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{kind}"].chunk(3)):
                out[f"{block}attn1.to_{name}.{kind}"] = part
        out[f"{emb}class_embedder.embedding_table.weight"] = table
    config = {"_class_name": DIFFUSERS_CLASSES[0], "num_attention_heads": m.num_heads,
              "attention_head_dim": m.hidden_size // m.num_heads, "in_channels": sizes.latent_channels,
              "out_channels": sizes.latent_channels, "num_layers": depth, "dropout": 0.0, "norm_num_groups": 32,
              "attention_bias": True, "sample_size": sizes.latent_size, "patch_size": m.patch_size,
              "activation_fn": "gelu-approximate", "num_embeds_ada_norm": classes, "upcast_attention": False,
              "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": NORM_EPS}
    # Each copy its own tensor: safetensors refuses tensors sharing memory.
    return config, {k: v.detach().to("cpu").clone().contiguous() for k, v in out.items()}


def diffusers_dit_writer(cfg: UNetRunConfig, sizes: Sizes) -> DiffusersWriter:
    """What :func:`modules.run.export.save_network` calls to write an export's ``diffusers/`` copy: the
    ``DiTTransformer2DModel`` where one computes the network's function, else the reason there is none."""
    def write(folder: Path, tensors: dict[str, torch.Tensor]) -> Optional[str]:
        problem = diffusers_dit_problem(cfg, sizes)
        if problem:
            return problem
        config, weights = to_diffusers_dit(tensors, cfg, sizes)
        write_diffusers_folder(folder / DIFFUSERS_FOLDER, config, weights)
        return None
    return write
