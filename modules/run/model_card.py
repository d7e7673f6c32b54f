"""The model card (``README.md``) every export carries: YAML front matter as the Hugging Face Hub reads it
(``license``, ``library_name``, ``tags``, ``pipeline_tag``, ``datasets``, ``metrics``), then what the model is,
what it was trained on and for how long, its latent space, the scores evaluate.py measured (a sweep's
``sweep.json``, given to publish.py), how to sample it here and with diffusers, and its resolved config.

Built from the export's own ``config.json`` record, so a card never says more than the folder holds. The
front matter is written as JSON scalars, which YAML reads as they are.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

CARD_NAME = "README.md"
DEFAULT_LICENSE = "other"      # the Hub's id for "see the card": the trainer sets the real one (publish.py --license)
SCORE_COLUMNS = ("ema_length", "steps", "cfg_scale", "fid", "kid", "precision", "recall", "inception_score",
                 "num_samples")
POWERS_OF_TWO = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OBJECTIVE_TAGS = {"flow": "flow-matching", "shortcut": "shortcut-model", "meanflow": "meanflow", "imf": "meanflow",
                  "ddpm": "ddpm"}
PIPELINE_TAGS = {"text": "text-to-image", "mask": "image-to-image"}
ARCH_NAMES = {"dit": "DiT", "unet": "UNet", "icdit": "in-context DiT"}


def front_matter(values: dict) -> str:
    """``---``-fenced YAML of ``values`` (scalars and lists of scalars; None values left out)."""
    lines = ["---"]
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            lines.append(f"{key}:")
            lines.extend(f"- {json.dumps(item)}" for item in value)
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines + ["---", ""])


def _data_source(path: str) -> tuple[str, Optional[str]]:
    """(how the card names the training data, the Hub data set id when it is one)."""
    if not path:
        return "not recorded", None
    if path.startswith(("/", ".", "~")) or "\\" in path or path.count("/") > 1:
        return f"a local folder (`{Path(path).name}`)", None
    return f"the Hub data set [`{path}`](https://huggingface.co/datasets/{path})", path


def _normalisation(model: dict, run_norm: Optional[dict]) -> tuple[str, str]:
    """(a sentence on how latents are normalised, the Python expression mapping a normalised latent ``x`` back
    to the VAE's ``z``), from the VAE's config and a stage-2 run's own ``latent_norm`` record."""
    fields = {**model, **(run_norm or {})}
    scale, shift = fields.get("scale_factor", 1.0), fields.get("shift_factor", 0.0) or 0.0
    mean, std = fields.get("latents_mean") or [], fields.get("latents_std") or []
    where = "the run's `latent_norm.mode=channel`" if run_norm else "the VAE's config"
    if mean:
        shown = ", ".join(f"{name} [{', '.join(f'{v:.5g}' for v in values)}]" for name, values in
                          (("mean", mean), ("std", std)))
        return (f"`x = (z - mean) * {scale:g} / std` per channel ({where}): {shown}",
                f"x * torch.tensor({std}).view(1, -1, 1, 1) / {scale!r} + torch.tensor({mean}).view(1, -1, 1, 1)")
    if shift:
        return f"`x = (z - {shift!r}) * {scale!r}` ({where})", f"x / {scale!r} + {shift!r}"
    return f"`x = z * {scale!r}` ({where})", f"x / {scale!r}"


def markdown_table(columns: list[str], table: list[list]) -> list[str]:
    """A Markdown table's lines: a header of ``columns``, then one line per row (floats to 4 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    return lines + ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
                    for row in table]


def _scores_table(rows: list[dict]) -> list[str]:
    columns = [c for c in SCORE_COLUMNS if any(c in row for row in rows)]
    lines = markdown_table(columns, [[row.get(c, "") for c in columns] for row in rows])
    references = sorted({str(row.get("reference")) for row in rows if row.get("reference")})
    return lines + ["", f"Measured by `evaluate.py sweep` against {', '.join(f'`{r}`' for r in references)}."
                    if references else ""]


def _batches(train: dict) -> str:
    accumulation = train.get("grad_accum", 1)
    return (f"{train.get('max_steps')} optimizer steps of batch {train.get('batch_size')} per process"
            + (f" (x {accumulation} accumulation)" if accumulation != 1 else "") + f", learning rate {train.get('lr')}")


def _config_block(values) -> list[str]:
    return ["<details><summary>The resolved config</summary>", "", "```json", json.dumps(values, indent=1),
            "```", "", "</details>", ""]


def vae_card(record: dict, diffusers: Optional[str], repo: Optional[str] = None,
             license: str = DEFAULT_LICENSE) -> str:
    """The card of a VAE export (``record``: its config.json). ``diffusers``: None when the folder holds a
    ``diffusers/`` copy, else why it does not."""
    model, run = record.get("model") or {}, record.get("run_config")
    factor = 2 ** (len(model.get("channel_mult", (1,))) - 1)
    channels = model.get("latent_channels")
    name = repo or "path/to/this/folder"
    data_text, dataset = _data_source((run or {}).get("data", {}).get("path", "")) if run else ("not recorded", None)
    norm_text, denormalize = _normalisation(model, None)
    head = front_matter({"license": license, "library_name": "diffusers" if diffusers is None else None,
                         "tags": ["autoencoder", "vae", "latent-diffusion", "kl-autoencoder"],
                         "datasets": [dataset] if dataset else None})
    lines = [head, f"# KL autoencoder (f{factor}, {channels} latent channels)", "",
             f"A KL-regularised autoencoder (Stable Diffusion's VAE architecture): images in [-1, 1] to "
             f"{channels}-channel latents {factor}x smaller per side.", ""]
    if run:
        train = run.get("train", {})
        lines += ["## Training", "", f"- data: {data_text}, {run.get('data', {}).get('image_size')} px images",
                  f"- {_batches(train)}", ""]
    else:
        lines += ["This copy records no training details (a stage-2 run's copy of its VAE, or a VAE converted "
                  "from elsewhere).", ""]
    lines += ["## Latents", "", f"Stage 2 models {norm_text}.", "", "## Use", "", "Here:", "", "```bash",
              f"python train_unet.py --vae {name} --data ./images --output-dir runs/unet", "```", ""]
    if diffusers is None:
        sub = 'subfolder="diffusers"'
        source = f'"{repo}", {sub}' if repo else f'"path/to/folder", {sub}'
        lines += ["With diffusers (the same weights and config in `diffusers/`):", "", "```python",
                  "from diffusers import AutoencoderKL", f"vae = AutoencoderKL.from_pretrained({source})",
                  "z = vae.encode(images).latent_dist.sample()    # images in [-1, 1]; x: see Latents",
                  f"images = vae.decode({denormalize}).sample    # latents: normalised (x)",
                  "```", ""]
    else:
        lines += [f"No diffusers copy: {diffusers}.", ""]
    return "\n".join(lines + _config_block({"model": model, "run_config": run}))


def _sampling_steps(cfg) -> str:
    valid = [s for s in POWERS_OF_TWO if cfg.sampling_problem(None, s) is None]
    return "any number of steps" if len(valid) == len(POWERS_OF_TWO) else \
        "step counts " + ", ".join(map(str, valid))


def network_card(record: dict, cfg, diffusers: Optional[str], scores: Optional[list[dict]] = None,
                 repo: Optional[str] = None, license: str = DEFAULT_LICENSE) -> str:
    """The card of a stage-2 export (``record``: its config.json; ``cfg``: its run config, typed). ``diffusers``:
    None when the folder holds a ``diffusers/`` DiTTransformer2DModel, else why it does not. ``scores``: rows of
    an evaluate.py sweep."""
    sizes, vae = record.get("sizes") or {}, record.get("vae") or {}
    cond, objective = cfg.cond.type, cfg.objective
    arch, arch_name = cfg.model.arch, ARCH_NAMES.get(cfg.model.arch, cfg.model.arch)
    what = {"class": f"class-conditional ({sizes.get('num_classes')} classes)", "none": "unconditional",
            "text": "text-conditioned", "mask": "mask-conditioned"}[cond]
    data_text, dataset = _data_source(cfg.data.path)
    norm_text, denormalize = _normalisation(vae.get("model") or {}, vae.get("latent_norm"))
    channels, size = sizes.get("latent_channels"), sizes.get("latent_size")
    tags = ["latent-diffusion", arch, OBJECTIVE_TAGS.get(objective, objective)]
    tags += {"class": ["class-conditional"], "text": ["text-to-image"], "mask": ["mask-conditioned"]}.get(cond, [])
    head = front_matter({"license": license, "library_name": "diffusers" if diffusers is None else None,
                         "tags": tags, "pipeline_tag": PIPELINE_TAGS.get(cond, "unconditional-image-generation"),
                         "datasets": [dataset] if dataset else None,
                         "metrics": sorted({c for row in scores or [] for c in ("fid", "kid", "precision", "recall",
                                                                                  "inception_score") if c in row})
                         or None})
    posthoc = record.get("posthoc_ema") if isinstance(record.get("posthoc_ema"), dict) else {}
    weights = {"ema": f"EMA (decay {record.get('ema_decay')})",
               "posthoc_ema": f"post-hoc EMA (sigma_rel {posthoc.get('sigma_rel')}, made by posthoc_ema.py)"
               }.get(record.get("weights"), "online")
    train = cfg.train
    lines = [head, f"# {arch_name}: {what} latent {objective} model", "",
             f"A {what} {arch_name} trained with the `{objective}` objective on {channels}x{size}x{size} "
             f"latents of a KL autoencoder ({cfg.data.image_size} px images). These are the "
             f"{weights} weights.", "",
             "## Training", "", f"- data: {data_text}, {cfg.data.image_size} px",
             f"- objective: `{objective}`; samples with {_sampling_steps(cfg)} "
             f"(samplers: {', '.join(cfg.objective_class.samplers)}); grids were logged at "
             f"{', '.join(map(str, cfg.sample.steps))} steps",
             f"- {_batches(dataclasses.asdict(train))}, {train.lr_schedule} schedule",
             f"- latents: stage 2 models {norm_text}", ""]
    if scores:
        lines += ["## Scores", ""] + _scores_table(scores) + [""]
    steps = cfg.sample.steps[-1]
    if repo:
        local = repo.split("/")[-1]
        commands = [f"hf download {repo} --local-dir {local}",
                    f"python sample.py --unet {local} --vae {local}/vae --out samples --num-samples 16 --steps {steps}"]
    else:
        commands = [f"python sample.py --unet path/to/this/folder --out samples --num-samples 16 --steps {steps}"]
    lines += ["## Sample", "", "With this toolkit (its VAE is the one it was trained with"
              + (", in `vae/`" if repo else ", found from the record in config.json") + "):", "", "```bash",
              *commands, "```", ""]
    if diffusers is None:
        source = f'"{repo}", subfolder="diffusers"' if repo else '"path/to/folder/diffusers"'
        vae_source = f'"{repo}", subfolder="vae/diffusers"' if repo else '"path/to/vae/diffusers"'
        labels = f"torch.arange(4) % {sizes.get('num_classes')}" if cond == "class" else \
            "torch.zeros(4, dtype=torch.long)"
        lines += ["With diffusers (`diffusers/` holds a `DiTTransformer2DModel` computing the same function; it "
                  "takes the timestep `1000 * t`, t from 0 (noise) to 1 (data)" +
                  (f", and the label {sizes.get('num_classes')} for no class" if cond == "class"
                   else ", and label 0 always") + "):", "",
                  "```python", "import torch", "from diffusers import AutoencoderKL, DiTTransformer2DModel",
                  f"net = DiTTransformer2DModel.from_pretrained({source}).eval()",
                  f"vae = AutoencoderKL.from_pretrained({vae_source}).eval()",
                  f"labels, steps = {labels}, {steps}",
                  f"x = torch.randn(len(labels), {channels}, {size}, {size})"]
        if objective == "flow":
            lines += ["with torch.no_grad():", "    for i in range(steps):    # Euler steps along the flow",
                      "        t = torch.full((len(labels),), i / steps)",
                      "        x = x + net(x, timestep=1000 * t, class_labels=labels).sample / steps",
                      f"    images = vae.decode({denormalize}).sample    # in [-1, 1]"]
        else:
            lines += [f"# objective={objective}: the network predicts epsilon at timestep 1000 * t, t = step / "
                      f"{getattr(cfg.objective_cfg, 'num_timesteps', 1000)} (Stable Diffusion's scaled-linear "
                      "schedule); decode with", f"# vae.decode({denormalize})"]
        lines += ["```", ""]
    else:
        lines += [f"No diffusers copy: {diffusers}.", ""]
    return "\n".join(lines + _config_block(record["run_config"]))


