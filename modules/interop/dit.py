"""Pretrained DiT weights from diffusers (``DiTTransformer2DModel``, safetensors) into ours: ``init_from``.

    train_unet.py --config dit-xl ... init_from=path/to/DiT-XL-2-256     # a diffusers folder

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

import logging
from pathlib import Path
from typing import Optional

import torch

from modules.config.io import read_json
from modules.config.schema import UNetRunConfig
from modules.core.networks.denoiser import Sizes
from modules.errors import ModelFolderError
from modules.core.networks.dit import NORM_EPS
from modules.run.export import (CONFIG_NAME, DIFFUSERS_FOLDER, DIFFUSERS_WEIGHTS_NAME, DiffusersWriter,
                                load_state_strict, read_weights, write_diffusers_folder)

logger = logging.getLogger(__name__)

DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")   # the latter: DiT pipelines before diffusers 0.28
EMBEDDER = "transformer_blocks.{}.norm1.emb."
# Parts of our DiT that a diffusers DiT does not have: they keep their fresh initialisation.
NEW_PARTS = ("level_emb.", "guidance_emb.", "conditioner.encoder.", "conditioner.to_concat.",
             "conditioner.null_channels", "conditioner.text_pool.", "conditioner.null_text")


def _refuse_pickle(path: Path) -> None:
    raise ModelFolderError(
        f"{path}: pickled checkpoints (the DiT repository's .pt files, .bin, .ckpt) are not loaded: unpickling "
        "can run code. Convert it once, where you trust the file, to a diffusers folder with safetensors weights "
        "(diffusers' scripts/convert_dit_to_diffusers.py, then save_pretrained(..., safe_serialization=True)) "
        "and pass that folder")


def read_diffusers_dit(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """``(config, weights, weights file)`` of a diffusers DiT: its folder, a pipeline folder holding
    ``transformer/``, or its ``.safetensors`` file with ``config.json`` beside it."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"init_from {path}: does not exist (expected a diffusers DiTTransformer2DModel "
                               "folder or its .safetensors file)")
    if path.is_file():
        if path.suffix != ".safetensors":
            _refuse_pickle(path)
        folder, weights = path.parent, path
    else:
        folder = path / "transformer" if (path / "transformer" / CONFIG_NAME).is_file() else path
        weights = folder / DIFFUSERS_WEIGHTS_NAME
        if not weights.is_file():
            pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            if pickles:
                _refuse_pickle(pickles[0])
            raise ModelFolderError(f"init_from {folder}: no {DIFFUSERS_WEIGHTS_NAME} (expected a diffusers "
                                   "DiTTransformer2DModel folder)")
    if not (folder / CONFIG_NAME).is_file():
        raise ModelFolderError(f"init_from {folder}: no {CONFIG_NAME} beside the weights (diffusers' model config)")
    config = read_json(folder / CONFIG_NAME, ModelFolderError)
    if not isinstance(config, dict) or config.get("_class_name") not in DIFFUSERS_CLASSES \
            or config.get("norm_type") != "ada_norm_zero" or not config.get("patch_size"):
        name = config.get("_class_name") if isinstance(config, dict) else None
        raise ModelFolderError(f"init_from {folder / CONFIG_NAME}: describes {name or 'an unknown model'}, not a "
                               "diffusers DiT (DiTTransformer2DModel, norm_type ada_norm_zero)")
    return typed_config(config, folder / CONFIG_NAME), read_weights(weights), weights


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


def load_init_weights(model: torch.nn.Module, cfg: UNetRunConfig, sizes: Sizes) -> None:
    """Load ``cfg.init_from`` (a diffusers DiT) into the freshly built DiT ``model`` (built for ``sizes``);
    anything that does not fit is one line naming the config key, or the size and where it comes from."""
    config, weights, where = read_diffusers_dit(cfg.init_from)
    fields = dit_fields(config, weights, where)
    ours = {"model.hidden_size": cfg.model.hidden_size, "model.depth": cfg.model.depth,
            "model.num_heads": cfg.model.num_heads, "model.patch_size": cfg.model.patch_size,
            "model.mlp_ratio": cfg.model.mlp_ratio}
    for key, value in ours.items():
        if fields[key] != value:
            raise ModelFolderError(f"init_from {where}: the checkpoint has {key}={fields[key]}, this run "
                                   f"{key}={value}: set {key}={fields[key]} or start from another DiT")
    derived = {"latent channels": (sizes.latent_channels, "the VAE's")}
    if cfg.cond.type == "class":
        derived["classes"] = (sizes.num_classes, "the data's")
    for what, (value, origin) in derived.items():
        if fields[what] != value:
            raise ModelFolderError(f"init_from {where}: the checkpoint has {fields[what]} {what}, this run "
                                   f"{value} ({origin}): start from a DiT made for them")
    if config.get("sample_size") not in (None, sizes.latent_size):
        logger.warning("init_from %s was made for %sx%s latents, this run has %dx%d: diffusers would rescale the "
                       "position codes to its own grid, ours keeps the DiT code's unscaled grid", where,
                       config["sample_size"], config["sample_size"], sizes.latent_size, sizes.latent_size)
    sd = convert_diffusers_dit(weights, config, where)
    fresh = model.state_dict()
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
