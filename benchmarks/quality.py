"""Sample quality against step count: a shortcut model and a flow-matching model, mask-conditioned.

    python benchmarks/quality.py --preset cpu --workdir runs/quality_cpu --out results/quality_cpu
    python benchmarks/quality.py --preset gpu --workdir runs/quality_gpu --out results/quality_gpu
    python benchmarks/quality.py --preset micro --workdir /tmp/quality_micro   # seconds: smoke test
    python benchmarks/quality.py --preset cpu --arch dit --workdir runs/quality_cpu_dit   # the same table, a DiT
    python benchmarks/quality.py --preset cpu --cond text --workdir runs/quality_cpu_text  # text prompts
    python benchmarks/quality.py --preset cpu --workdir runs/q --variants all --seeds 2 --guidance 1.5,2,3
        # every row of VARIANTS that fits the condition (flow, shortcut, each iSM switch, MeanFlow, iMF), two
        # training seeds each, and each at guidance 1 and at its best guidance of the sweep
    python benchmarks/quality.py --preset cpu --cond class --workdir runs/q_ot --variants shortcut,shortcut+ot \
        --seeds 2      # class-conditional: OT pairing within each class against none (class accuracy)
    python benchmarks/quality.py --preset cpu --cond class --workdir runs/q_phema --variants shortcut,imf \
        --guidance 2,4,8 --ema-lengths 0.05,0.1,0.15,0.2   # and 1-step scores of post-hoc EMA lengths

A miniature of the shortcut paper's main comparison (one-step samples close to 128-step ones
for a shortcut model, far worse for flow matching), run through the product's own entry
points: ``main(argv)`` of train_vae.py, train_unet.py and sample.py, in this process, with
the same arguments as the printed command lines.

1. data: synthetic shapes (scripts/shapes.py) with exact masks: a training set and a
   held-out evaluation set drawn with another seed;
2. stage 1: train_vae.py (no GAN, no LPIPS: L1 + KL is enough for flat-coloured shapes);
3. stage 2: train_unet.py once per variant (``--variants``, default ``objective=shortcut`` and
   ``objective=flow``) and training seed (``--seeds``), identical otherwise (network, data, steps,
   batch, lr, EMA), conditioned on masks; ``--arch`` picks the network: the preset's small UNet or
   its small DiT (same steps, batch and lr);
4. sample.py with every held-out mask at each step count (each objective's own sampler: shortcut,
   Euler for flow, meanflow; same noise seeds for every model), at guidance 1; with ``--guidance``,
   also one step at each listed scale, and every step count at the variant's best scale (lowest
   1-step FD pixels, averaged over seeds);
5. per (model, steps):
   * mask IoU between the conditioning mask and ``foreground_mask`` of the generated image
     (saturated pixels: shapes are saturated, backgrounds are not), mean over images;
   * Frechet distance to the held-out real images in two feature spaces that need no
     download (there is no Inception network here, so these are not FID):
     ``pixels``: the image area-averaged to 8x8 (192 numbers, colour and layout);
     ``random conv``: per-channel mean and std of a fixed, randomly initialised (seed 0)
     three-layer ReLU conv net (128 numbers, local contrast and texture statistics).
Reference rows: an independent real set with its own masks (the Frechet distance between two
real samples of this size, and the IoU of ``foreground_mask`` on clean images, 1.0) and VAE
reconstructions of the held-out images (the best a latent model can reach through this VAE).

``--cond text`` conditions every run on the captions instead ("a red square on a striped
background", through a tiny random CLIP text encoder written by scripts/tiny_clip.py: no
download), samples one image per held-out caption (``sample.py --prompts``) and replaces the mask
IoU by **prompt fidelity**: the fraction of images whose colour and shape, read back with
``scripts.shapes.read_caption``, are the prompt's (and each word's match rate alone).

``--cond class`` conditions every run on the shape's class (circle, square, triangle: the training
set's class folders), samples the held-out set's classes in turn (``sample.py --class-label all``:
image i is class i mod 3, as held-out image i) and replaces the mask IoU by **class accuracy**: the
fraction of images whose shape, read back with ``scripts.shapes.read_caption``, is their class. It is
the condition OT pairing needs (``train.ot_pairing`` pairs within each class and is refused with
masks and prompts), so the OT rows run only under it.

``--ema-lengths`` trains every run with post-hoc EMA snapshots (``ema.posthoc=true``, a snapshot every
twentieth of the training steps) and, after the table above, rebuilds each listed EMA length with
``posthoc_ema.py``'s own reconstruction (``unet_phema_<length>`` in the run folder) and scores it at 1
step at the variant's best guidance; the report names each variant's best length.

The iMF rows (``objective=imf``) train the in-context DiT (``model.arch=icdit``) at the preset's DiT
sizes whatever ``--arch`` says (no other network takes the guidance interval), with the last half of
its blocks as the u head (and, with the velocity head, as many again for v).

Results: a markdown table on stdout, ``OUT/quality.md``, ``OUT/quality.json`` (numbers,
commands, stage times, machine) and ``OUT/quality_grid.png`` (held-out images, their masks,
their VAE reconstructions, then one row per model and step count: same masks, same seeds).
On a CPU the default is one torch thread (see ``--threads``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sample  # noqa: E402
import train_unet  # noqa: E402
import train_vae  # noqa: E402
from modules.core.metrics import feature_statistics, frechet_distance, mask_iou  # noqa: E402
from modules.interop.vae import load_vae  # noqa: E402
from modules.errors import ConfigError  # noqa: E402
from modules.run import posthoc  # noqa: E402
from modules.run.export import find_model_folder  # noqa: E402
from scripts.shapes import (SHAPES, caption_words, foreground_mask, make_shapes, read_caption,  # noqa: E402
                           render_shape_batch, shape_captions)
from scripts.tiny_clip import write_tiny_clip  # noqa: E402

# Rows of the comparison: objective and extra train_unet.py overrides. The iSM switches (README
# "Improved shortcut training"): 2 wavelet levels take the 8x8 latents of the cpu preset down to 2x2;
# an OT pool of 8 micro-batches of 32 is one 256-row assignment (within each class: --cond class only).
# MeanFlow with omega = 2 learns the guided average velocity (scale 2) and is sampled with one conditional
# forward per step. iMF takes w and the guidance interval as inputs (imf.sample_interval at sampling);
# "imf+boundary" has no velocity head (v = u(z, t, t)).
OT = ("train.ot_pairing=true", "train.ot_pool=8")
VARIANTS = {
    "shortcut": ("shortcut", ()),
    "flow": ("flow", ()),
    "shortcut+guidance": ("shortcut", ("shortcut.intrinsic_guidance=true",)),
    "shortcut+wavelet": ("shortcut", ("shortcut.wavelet_levels=2",)),
    "shortcut+ot": ("shortcut", OT),
    "shortcut+all": ("shortcut", ("shortcut.intrinsic_guidance=true", "shortcut.wavelet_levels=2") + OT),
    "meanflow": ("meanflow", ()),
    "meanflow+guidance": ("meanflow", ("meanflow.omega=2.0",)),   # the paper's guidance, folded into training
    "imf": ("imf", ()),
    "imf+boundary": ("imf", ("imf.velocity_head=false",)),
}
DEFAULT_VARIANTS = ("shortcut", "flow")
SAMPLER = {"shortcut": "shortcut", "flow": "euler", "meanflow": "meanflow", "imf": "meanflow"}
OWN_ARCH = {"imf": "icdit"}     # objectives whose network is not --arch's


def variant_problem(variant: str, cond: str) -> Optional[str]:
    """Why ``variant`` cannot run conditioned on ``cond``, or None."""
    if cond != "class" and any(switch.startswith("train.ot_pairing=true") for switch in VARIANTS[variant][1]):
        return (f"{variant} pairs noise within each class (train.ot_pairing), which masks and prompts do not have: "
                "run it with --cond class")
    return None
TRAIN_SEED, EVAL_SEED, REFERENCE_SEED = 0, 1, 2
PIXEL_GRID = 8
RANDOM_CONV_WIDTHS = (32, 64, 64)
GRID_IMAGES = 10


@dataclass(frozen=True)
class Preset:
    """One benchmark size. ``*_args`` are config overrides given to both runs of a stage."""

    image_size: int
    num_train: int
    num_eval: int
    steps: tuple[int, ...]          # sampling step counts; the largest is shortcut.denoise_timesteps
    vae_steps: int
    vae_args: tuple[str, ...]
    unet_steps: int
    unet_args: tuple[str, ...]      # --arch unet
    dit_args: tuple[str, ...]       # --arch dit
    sample_batch: int


def _vae_args(base: int, mult: str, batch: int, lr: float) -> tuple[str, ...]:
    # disc_start beyond the run: L1 + KL only (a GAN adds noise to a short benchmark run).
    return (f"model.base_channels={base}", f"model.channel_mult={mult}", "model.norm_groups=8",
            f"train.batch_size={batch}", f"train.lr={lr}", "loss.perceptual_weight=0",
            "loss.disc_start=100000000", "data.num_val_images=16")


def _stage2_args(batch: int, lr: float, ema: float) -> tuple[str, ...]:
    """Masks concatenated to the latents (spatially aligned: the cheapest to learn), no weight decay
    (a few thousand steps); the rest from configs/unet/tiny.json and the defaults."""
    return ("cond.type=mask", "cond.mask_mode=concat", "cond.mask_channels=32",
            f"train.batch_size={batch}", f"train.lr={lr}", "train.weight_decay=0.0", f"ema.decay={ema}")


def _unet_args(base: int, mult: str, attention: str, batch: int, lr: float, ema: float) -> tuple[str, ...]:
    return (f"model.base_channels={base}", f"model.channel_mult={mult}", f"model.attention_levels={attention}",
            "model.num_res_blocks=1", f"model.head_dim={min(base, 32)}", f"model.context_dim={base}",
            "model.norm_groups=8") + _stage2_args(batch, lr, ema)


def _dit_args(hidden: int, depth: int, heads: int, patch: int, batch: int, lr: float, ema: float) -> tuple[str, ...]:
    return ("model.arch=dit", f"model.hidden_size={hidden}", f"model.depth={depth}", f"model.num_heads={heads}",
            f"model.patch_size={patch}") + _stage2_args(batch, lr, ema)


PRESETS = {
    # The whole pipeline in seconds, for the smoke test; its numbers mean nothing.
    "micro": Preset(image_size=16, num_train=24, num_eval=8, steps=(1, 2), vae_steps=3,
                    vae_args=_vae_args(8, "1,2,2", 4, 1e-3), unet_steps=3,
                    unet_args=_unet_args(16, "1,2", "1", 4, 1e-3, 0.9),
                    dit_args=_dit_args(16, 1, 2, 2, 4, 1e-3, 0.9), sample_batch=8),
    # Measured on 2 CPU cores (BENCHMARKS.md): 32 px, 8x8x4 latents, a 1M-parameter UNet; the DiT
    # (1.3M parameters, 4x4 tokens, not yet measured) trains a step in at most the UNet's time.
    "cpu": Preset(image_size=32, num_train=2048, num_eval=512, steps=(1, 2, 4, 8, 128), vae_steps=2000,
                  vae_args=_vae_args(16, "1,2,2", 16, 1e-3), unet_steps=2000,
                  unet_args=_unet_args(32, "1,2", "1", 32, 1e-3, 0.999),
                  dit_args=_dit_args(128, 4, 4, 2, 32, 1e-3, 0.999), sample_batch=256),
    # Not measured (no GPU in the session that wrote it): 64 px, 16x16x4 latents, a 26M-parameter UNet
    # or DiT-S/2 (33M).
    "gpu": Preset(image_size=64, num_train=20000, num_eval=5000, steps=(1, 2, 4, 8, 128), vae_steps=10000,
                  vae_args=_vae_args(64, "1,2,4", 32, 2e-4) + ("data.num_workers=4",), unet_steps=30000,
                  unet_args=_unet_args(128, "1,2,2", "1,2", 128, 2e-4, 0.9999) + ("data.num_workers=4",),
                  dit_args=_dit_args(384, 12, 6, 2, 128, 2e-4, 0.9999) + ("data.num_workers=4",),
                  sample_batch=500),
}


# ----------------------------------------------------------------------------- stages

@dataclass
class Stage:
    name: str
    command: str
    seconds: float


def run_entry_point(name: str, script: str, main: Callable[[list[str]], None], argv: list[str],
                    stages: list[Stage]) -> None:
    """Call a script's ``main(argv)`` and record the equivalent command line and its wall time."""
    command = f"python {script} {shlex.join(argv)}"
    print(f"\n[quality] {name}: {command}", flush=True)
    start = time.perf_counter()
    main(argv)
    stages.append(Stage(name, command, time.perf_counter() - start))
    print(f"[quality] {name}: {stages[-1].seconds:.0f} s", flush=True)


def training_args(preset: Preset, max_steps: int, log_every: int) -> list[str]:
    return [f"data.image_size={preset.image_size}", f"--max-steps={max_steps}", f"train.checkpoint_every={max_steps}",
            f"train.image_log_every={max_steps}", f"train.log_every={log_every}", f"train.val_every={max_steps}"]


def network_args(preset: Preset, arch: str, objective: str) -> list[str]:
    """The network's overrides: --arch's, or for an objective with its own network (iMF) the preset's DiT sizes
    in that network, the last half of the blocks the u head."""
    own = OWN_ARCH.get(objective)
    if own is None:
        return list(preset.unet_args if arch == "unet" else preset.dit_args)
    depth = next(int(a.split("=", 1)[1]) for a in preset.dit_args if a.startswith("model.depth="))
    return ([f"model.arch={own}" if a == "model.arch=dit" else a for a in preset.dit_args]
            + [f"model.aux_head_depth={max(1, depth // 2)}"])


def unet_args(preset: Preset, arch: str, variant: str, seed: int, data: Path, vae: Path, out: Path,
              extra: list[str], text_encoder: Optional[Path] = None, cond: str = "mask") -> list[str]:
    """train_unet.py's arguments; with a ``text_encoder``, captions replace the masks as the condition, and with
    ``cond`` "class" the shapes' classes do."""
    max_sampling = max(preset.steps)
    objective, switches = VARIANTS[variant]
    network = network_args(preset, arch, objective)
    if text_encoder is not None:
        pooled = ["cond.text_mode=pooled"] if objective in OWN_ARCH else []    # the in-context DiT pools the text
        network = [a for a in network if not a.startswith("cond.")] + ["cond.type=text",
                                                                          f"cond.text_encoder={text_encoder}", *pooled]
    elif cond == "class":
        network = [a for a in network if not a.startswith("cond.")] + ["cond.type=class"]
    return (["--config", "tiny", "--data", str(data), "--vae", str(vae), "--output-dir", str(out),
             "--report-to", "none", f"objective={objective}", f"shortcut.denoise_timesteps={max_sampling}",
             f"sample.steps=1,{max_sampling}", "sample.num_images=8", f"train.seed={seed}"]
            + training_args(preset, preset.unet_steps, max(1, preset.unet_steps // 20))
            + network + list(switches) + extra)


@dataclass(frozen=True)
class Run:
    """One trained model: a variant at a training seed; with ``ema_length``, that run's post-hoc EMA of
    this length (sigma_rel) instead of its training EMA."""
    variant: str
    seed: int
    ema_length: Optional[float] = None

    @property
    def name(self) -> str:
        trained = self.variant if self.seed == 0 else f"{self.variant}_seed{self.seed}"
        return trained if self.ema_length is None else f"{trained}_phema{self.ema_length:g}"

    def model(self, work: Path) -> Path:
        """The folder sample.py reads: the training run's, or the post-hoc EMA's export inside it."""
        trained = work / f"unet_{Run(self.variant, self.seed).name}"
        return trained if self.ema_length is None else trained / posthoc.export_name(self.ema_length)

    @property
    def sampler(self) -> str:
        return SAMPLER[VARIANTS[self.variant][0]]


# ----------------------------------------------------------------------------- images and features

def read_images(files: list[Path]) -> np.ndarray:
    """uint8 [N, H, W, 3]."""
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB")))
    return np.stack(out)


def read_masks(files: list[Path]) -> np.ndarray:
    """bool [N, H, W] (mask PNGs are 0/255)."""
    out = []
    for f in files:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("L")) >= 128)
    return np.stack(out)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def pixel_features(images: np.ndarray) -> np.ndarray:
    """The image area-averaged to PIXEL_GRID x PIXEL_GRID, flattened: [N, 3 * PIXEL_GRID^2]."""
    return F.adaptive_avg_pool2d(to_unit(images), PIXEL_GRID).flatten(1).double().numpy()


@torch.no_grad()
def random_conv_features(images: np.ndarray, seed: int = 0, batch: int = 256) -> np.ndarray:
    """Per-channel mean and std of a fixed random ReLU conv net (He-normal weights from ``seed``)."""
    generator = torch.Generator().manual_seed(seed)
    weights, in_ch = [], 3
    for width in RANDOM_CONV_WIDTHS:
        weights.append(torch.randn(width, in_ch, 3, 3, generator=generator) * math.sqrt(2.0 / (in_ch * 9)))
        in_ch = width
    out = []
    for chunk in to_unit(images).split(batch):
        x = chunk
        for i, w in enumerate(weights):
            x = F.relu(F.conv2d(x, w, stride=1 if i == 0 else 2, padding=1))
        out.append(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1))
    return torch.cat(out).double().numpy()


FEATURES = {"fd_pixels": pixel_features, "fd_random_conv": random_conv_features}
FEATURE_NOTES = {
    "fd_pixels": f"images area-averaged to {PIXEL_GRID}x{PIXEL_GRID}: {3 * PIXEL_GRID ** 2} values in [-1, 1]",
    "fd_random_conv": f"per-channel mean and std of a fixed random ReLU conv net (widths {list(RANDOM_CONV_WIDTHS)}, "
                      f"He-normal, seed 0): {2 * RANDOM_CONV_WIDTHS[-1]} values"}
REFERENCE_REAL = "reference: independent real set"
REFERENCE_VAE = "reference: VAE reconstruction"
FD_LEGEND = (f"FD: Frechet distance to the held-out real images in {FEATURE_NOTES['fd_pixels']} (pixels) and "
             f"{FEATURE_NOTES['fd_random_conv']} (random conv); not FID.")
LEGEND = ("mask IoU: foreground_mask of each image against its conditioning (held-out) mask; the independent real "
          f"set is scored against its own masks. {FD_LEGEND} "
          "The independent real set has other masks than the held-out set, generated images share them, so "
          "generated sets can score below it; VAE reconstructions are the held-out images themselves after the "
          "VAE (the best a latent model can do through it).")


CLASS_LEGEND = ("class accuracy: fraction of images whose shape, read back with scripts.shapes.read_caption, is "
                "their class (circle, square, triangle); the independent real set is scored against its own classes "
                f"(the reader's accuracy on clean images). {FD_LEGEND}")


TEXT_LEGEND = ("prompt fidelity: fraction of images whose colour and shape, read back with "
               "scripts.shapes.read_caption, are the prompt's (colour, shape: each word alone); the independent "
               f"real set is scored against its own captions (the analysers' accuracy on clean images). {FD_LEGEND}")


def prompt_fidelity(images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Fractions of images whose read-back colour, shape, and both, are their caption's."""
    read = [read_caption(image) for image in images]
    wanted = [caption_words(c) for c in captions]
    colour = np.array([r[0] == w[0] for r, w in zip(read, wanted)])
    shape = np.array([r[1] == w[1] for r, w in zip(read, wanted)])
    return {"prompt_fidelity": float((colour & shape).mean()), "colour_match": float(colour.mean()),
            "shape_match": float(shape.mean())}


def class_accuracy(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The fraction of images whose read-back shape is their class's."""
    return {"class_accuracy": float(np.mean([read_caption(image)[1] == SHAPES[label]
                                             for image, label in zip(images, labels)]))}


class Scorer:
    """Mask IoU against the conditioning masks (or prompt fidelity against the conditioning captions, or
    class accuracy against the conditioning classes) and Frechet distances to the held-out images."""

    def __init__(self, real_images: np.ndarray, masks: np.ndarray, captions: Optional[list[str]] = None,
                 labels: Optional[np.ndarray] = None):
        self.masks = torch.from_numpy(masks)
        self.captions, self.labels = captions, labels
        self.reference = {name: feature_statistics(fn(real_images)) for name, fn in FEATURES.items()}

    def score(self, images: np.ndarray, masks: Optional[np.ndarray] = None,
              captions: Optional[list[str]] = None, labels: Optional[np.ndarray] = None) -> dict[str, float]:
        target = self.masks if masks is None else torch.from_numpy(masks)
        if self.labels is not None:
            scores = class_accuracy(images, self.labels if labels is None else labels)
        elif self.captions is not None:
            scores = prompt_fidelity(images, captions or self.captions)
        else:
            scores = {"mask_iou": float(mask_iou(torch.from_numpy(foreground_mask(images)), target, "mean"))}
        for name, fn in FEATURES.items():
            mu, sigma = feature_statistics(fn(images))
            scores[name] = frechet_distance(mu, sigma, *self.reference[name])
        return scores


@torch.no_grad()
def vae_reconstructions(vae_dir: Path, images: np.ndarray, batch: int, device: str) -> np.ndarray:
    """Posterior-mean encode and decode, rounded to uint8 as sample.py rounds its outputs."""
    vae = load_vae(find_model_folder(vae_dir, "vae")).to(device).eval()
    out = []
    for chunk in to_unit(images).split(batch):
        decoded = vae.decode(vae.encode(chunk.to(device)).mode()).float().clamp(-1, 1)
        out.append(((decoded + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)


def save_grid(rows: list[np.ndarray], path: Path, pad: int = 2) -> None:
    """Rows of uint8 [n, H, W, 3] images (same n) as one PNG on a black background."""
    n, h, w, _ = rows[0].shape
    grid = np.zeros((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), dtype=np.uint8)
    for r, row in enumerate(rows):
        for i, image in enumerate(row):
            top, left = pad + r * (h + pad), pad + i * (w + pad)
            grid[top:top + h, left:left + w] = image
    Image.fromarray(grid).save(path)


# ----------------------------------------------------------------------------- report

def machine() -> dict:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def markdown_table(rows: list[dict]) -> str:
    text, classes = "prompt_fidelity" in rows[0], "class_accuracy" in rows[0]
    condition = ("prompt fidelity", "colour", "shape") if text else ("class accuracy",) if classes else ("mask IoU",)
    keys = ("prompt_fidelity", "colour_match", "shape_match") if text else ("class_accuracy",) if classes \
        else ("mask_iou",)
    lines = ["| model | sampler | steps | " + " | ".join(condition) + " | FD pixels 8x8 | FD random conv |",
             "| --- | --- | --- | " + "--- | " * len(condition) + "--- | --- |"]
    for r in rows:
        steps = "-" if r["steps"] is None else str(r["steps"])
        lines.append(f"| {r['model']} | {r['sampler']} | {steps} | " + " | ".join(f"{r[k]:.3f}" for k in keys)
                     + f" | {r['fd_pixels']:.3f} | {r['fd_random_conv']:.3f} |")
    return "\n".join(lines)


METRIC_NAMES = {"mask_iou": "mask IoU", "prompt_fidelity": "prompt fidelity", "colour_match": "colour",
                "shape_match": "shape", "class_accuracy": "class accuracy", "fd_pixels": "FD pixels 8x8",
                "fd_random_conv": "FD random conv"}


def seed_summary(rows: list[dict], step_seconds: dict[str, list[float]]) -> tuple[list[dict], str]:
    """Rows averaged over training seeds (mean, min, max) per (variant, guidance, steps), and their table
    with each variant's training time per step."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "variant" in r:
            groups.setdefault((r["variant"], r.get("ema_length") or 0.0, r["guidance"], r["steps"]), []).append(r)
    order = list(VARIANTS)
    metrics = [m for m in METRIC_NAMES if any(m in r for r in rows if "variant" in r)]
    summary = [{"variant": v, "ema_length": e or None, "guidance": g, "steps": s, "seeds": len(rs),
                **{m: {"mean": float(np.mean([r[m] for r in rs])), "min": min(r[m] for r in rs),
                       "max": max(r[m] for r in rs)} for m in metrics}}
               for (v, e, g, s), rs in sorted(groups.items(), key=lambda item: (order.index(item[0][0]), *item[0][1:]))]
    lines = ["| model | guidance | steps | s / training step | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
             "| --- | --- | --- | --- | " + "--- | " * len(metrics)]
    for r in summary:
        cells = [f"{r[m]['mean']:.3f} ({r[m]['min']:.3f}-{r[m]['max']:.3f})" for m in metrics]
        seconds = f"{np.mean(step_seconds[r['variant']]):.3f}"
        model = r["variant"] if r["ema_length"] is None else f"{r['variant']}, post-hoc EMA {r['ema_length']:g}"
        lines.append(f"| {model} | {r['guidance']:g} | {r['steps']} | {seconds} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines)


# ----------------------------------------------------------------------------- main

def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--arch", choices=("unet", "dit"), default="unet", help="the stage-2 network of every run")
    p.add_argument("--cond", choices=("mask", "text", "class"), default="mask",
                   help="what every run is conditioned on: the held-out masks, their captions (prompt fidelity) or "
                        "their shapes' classes (class accuracy)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated rows to train and score, or 'all' (those that fit --cond): "
                        f"{', '.join(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=1, help="training seeds per variant (0, 1, ...)")
    p.add_argument("--guidance", default="", help="comma-separated guidance scales besides 1, tried at 1 step; "
                   "each variant is then sampled at every step count at its best one")
    p.add_argument("--ema-lengths", default="", help="comma-separated post-hoc EMA lengths (sigma_rel): every "
                   "run keeps EMA snapshots, and each length is rebuilt and scored at 1 step at its best guidance")
    p.add_argument("--workdir", type=Path, required=True,
                   help="folder for data, runs and samples; must be empty or absent")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: WORKDIR/results)")
    p.add_argument("--vae", type=Path, default=None,
                   help="use this trained VAE (folder or train_vae.py output dir) instead of training stage 1")
    p.add_argument("--unet-steps", type=int, default=None, help="override the preset's UNet training steps")
    p.add_argument("--vae-steps", type=int, default=None, help="override the preset's VAE training steps")
    p.add_argument("--num-eval", type=int, default=None, help="override the preset's number of held-out images")
    p.add_argument("--unet-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train_unet.py override for both runs (repeatable), e.g. shortcut.teacher_ema_decay=0.99")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 without CUDA, where a second job on a 2-core machine made "
                        "two-thread steps 5x slower than one-thread ones; all cores with CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for sample.py")
    args = p.parse_args(argv)
    if args.workdir.exists() and any(args.workdir.iterdir()):
        p.error(f"--workdir {args.workdir} is not empty; choose a new folder")
    if args.vae is not None and not args.vae.exists():
        p.error(f"--vae {args.vae}: not found")
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else (os.cpu_count() or 1)
    for name in ("unet_steps", "vae_steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_eval is not None and args.num_eval < 2:
        p.error("--num-eval must be >= 2 (a Frechet distance needs a covariance)")
    bad = [w for w in args.unet_override if "=" not in w]
    if bad:
        p.error(f"--unet-override {bad[0]!r} is not of the form key=value")
    if args.variants == "all":
        args.variants = tuple(v for v in VARIANTS if variant_problem(v, args.cond) is None)
    else:
        args.variants = tuple(v for v in args.variants.split(",") if v)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants {','.join(unknown)}: choose from {', '.join(VARIANTS)} or 'all'")
    problem = next(filter(None, (variant_problem(v, args.cond) for v in args.variants)), None)
    if problem:
        p.error(f"--variants: {problem}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    try:
        args.guidance = tuple(float(w) for w in args.guidance.split(",") if w.strip())
    except ValueError:
        p.error(f"--guidance {args.guidance!r}: expected comma-separated numbers")
    try:
        args.ema_lengths = tuple(posthoc.parse_lengths(args.ema_lengths, "--ema-lengths")) if args.ema_lengths \
            else ()
    except ConfigError as e:
        p.error(str(e))
    return args


def train_and_sample(args: argparse.Namespace, preset: Preset, work: Path, stages: list[Stage]
                     ) -> tuple[Path, Path, list[Run]]:
    """Stages 1-3: data, VAE, one UNet per run. Returns (held-out folder, VAE folder, runs)."""
    t0 = time.perf_counter()
    train_dir = make_shapes(work / "data" / "train", preset.num_train, preset.image_size, TRAIN_SEED)
    eval_dir = make_shapes(work / "data" / "eval", preset.num_eval, preset.image_size, EVAL_SEED, layout="flat")
    stages.append(Stage("data", f"scripts.shapes.make_shapes (train seed {TRAIN_SEED}, held-out seed {EVAL_SEED})",
                        time.perf_counter() - t0))

    vae_dir = args.vae.resolve() if args.vae is not None else work / "vae"
    if args.vae is None:
        argv_vae = (["--config", "tiny", "--data", str(train_dir), "--output-dir", str(vae_dir), "--report-to", "none",
                     "scale_samples=256"]
                    + training_args(preset, preset.vae_steps, max(1, preset.vae_steps // 20)) + list(preset.vae_args))
        run_entry_point("vae", "train_vae.py", train_vae.main, argv_vae, stages)

    # the same run for every variant and seed: only the objective, its switches and the seed differ
    clip = write_tiny_clip(work / "tiny_clip") if args.cond == "text" else None
    runs = [Run(variant, seed) for seed in range(args.seeds) for variant in args.variants]
    snapshots = (["ema.posthoc=true", f"ema.posthoc_every={max(1, preset.unet_steps // 20)}"] if args.ema_lengths
                 else [])
    for run in runs:
        run_entry_point(f"unet_{run.name}", "train_unet.py", train_unet.main,
                        unet_args(preset, args.arch, run.variant, run.seed, train_dir, vae_dir, run.model(work),
                                  [*args.unet_override, *snapshots], clip, args.cond), stages)
    return eval_dir, vae_dir, runs


def samples_dir(work: Path, run: str, steps: int, guidance: float = 1.0) -> Path:
    return work / "samples" / (f"{run}_{steps}" if guidance == 1.0 else f"{run}_cfg{guidance:g}_{steps}")


def sample_run(args: argparse.Namespace, preset: Preset, work: Path, eval_dir: Path, run: Run, steps: int,
               guidance: float, stages: list[Stage]) -> Path:
    """sample.py with every held-out mask (sample i is named like mask i) or caption (sample i is caption
    i's), with seed i, for every model."""
    out = samples_dir(work, run.name, steps, guidance)
    condition = ["--masks", str(eval_dir / "masks")]
    if args.cond == "text":
        prompts = work / "data" / "eval_prompts.txt"
        if not prompts.exists():
            prompts.write_text("\n".join(shape_captions(preset.num_eval, preset.image_size, EVAL_SEED)) + "\n")
        condition = ["--prompts", str(prompts), "--num-samples", "1"]
    elif args.cond == "class":
        condition = ["--class-label", "all", "--num-samples", str(preset.num_eval)]
    argv_sample = ["--unet", str(run.model(work)), "--out", str(out), *condition,
                   "--steps", str(steps), "--cfg-scale", f"{guidance:g}", "--batch-size", str(preset.sample_batch),
                   "--seed", "0", "--device", args.device]
    run_entry_point(f"sample_{run.name}_{steps}" + ("" if guidance == 1.0 else f"_cfg{guidance:g}"), "sample.py",
                    sample.main, argv_sample, stages)
    return out


def sample_and_score(args: argparse.Namespace, preset: Preset, work: Path, eval_dir: Path, vae_dir: Path,
                     runs: list[Run], stages: list[Stage], grid_path: Path) -> tuple[list[dict], dict[str, float]]:
    """Stages 4-5: samples at guidance 1 (and the guidance sweep), one row per reference and per (run,
    guidance, steps); writes the comparison grid (guidance 1). Returns the rows and each variant's best scale."""
    names = sorted(p.name for p in (eval_dir / "masks").iterdir())
    real = read_images([eval_dir / n for n in names])
    masks = read_masks([eval_dir / "masks" / n for n in names])
    text = args.cond == "text"
    # Held-out image i is class i mod 3 (make_shapes cycles the classes), as sample.py --class-label all's image i.
    labels = np.arange(len(names)) % len(SHAPES) if args.cond == "class" else None
    scorer = Scorer(real, masks, shape_captions(preset.num_eval, preset.image_size, EVAL_SEED) if text else None,
                    labels)
    independent, independent_masks, independent_labels = render_shape_batch(preset.num_eval, preset.image_size,
                                                                             REFERENCE_SEED)
    reconstructions = vae_reconstructions(vae_dir, real, preset.sample_batch, args.device)
    own_captions = shape_captions(preset.num_eval, preset.image_size, REFERENCE_SEED) if text else None
    rows = [{"model": REFERENCE_REAL, "sampler": "-", "steps": None,
             **scorer.score(independent, independent_masks, own_captions, independent_labels)},
            {"model": REFERENCE_VAE, "sampler": "-", "steps": None, **scorer.score(reconstructions)}]
    grid_rows = [real[:GRID_IMAGES], np.repeat(masks[:GRID_IMAGES, :, :, None] * np.uint8(255), 3, axis=3),
                 reconstructions[:GRID_IMAGES]]
    sample_names = [f"{i:06d}.png" for i in range(len(names))] if args.cond != "mask" else names   # sample.py's
    labels = {run: run.name if args.seeds == 1 else f"{run.variant} seed {run.seed}" for run in runs}

    def score(run: Run, steps: int, guidance: float) -> np.ndarray:
        folder = sample_run(args, preset, work, eval_dir, run, steps, guidance, stages)
        generated = read_images([folder / n for n in sample_names])
        sampler = run.sampler if guidance == 1.0 else f"{run.sampler}, guidance {guidance:g}"
        rows.append({"model": labels[run], "variant": run.variant, "seed": run.seed, "ema_length": run.ema_length,
                     "guidance": guidance, "sampler": sampler, "steps": steps, **scorer.score(generated)})
        return generated

    for run in runs:
        for steps in preset.steps:
            grid_rows.append(score(run, steps, 1.0)[:GRID_IMAGES])
    best = {}
    if args.guidance:
        for run in runs:
            for guidance in args.guidance:
                score(run, 1, guidance)
        for variant in dict.fromkeys(run.variant for run in runs):
            one_step = {g: np.mean([r["fd_pixels"] for r in rows if r.get("variant") == variant and r["steps"] == 1
                                    and r["guidance"] == g]) for g in (1.0, *args.guidance)}
            best[variant] = min(one_step, key=one_step.get)
        for run in runs:
            if best[run.variant] != 1.0:
                for steps in preset.steps[1:]:
                    score(run, steps, best[run.variant])
    for run in runs if args.ema_lengths else ():
        posthoc.export_reconstructions(run.model(work), args.ema_lengths)
        for length in args.ema_lengths:
            rebuilt = Run(run.variant, run.seed, length)
            labels[rebuilt] = f"{labels[run]}, post-hoc EMA {length:g}"
            score(rebuilt, 1, best.get(run.variant, 1.0))
    grid_path.parent.mkdir(parents=True, exist_ok=True)
    save_grid(grid_rows, grid_path)
    return rows, best


def step_times(stages: list[Stage], runs: list[Run], steps: int) -> dict[str, list[float]]:
    """Seconds per training step of each variant, one value per seed (the train_unet.py stage's wall time,
    its start-up and export included, over its steps)."""
    seconds = {s.name: s.seconds for s in stages}
    out: dict[str, list[float]] = {}
    for run in runs:
        out.setdefault(run.variant, []).append(seconds[f"unet_{run.name}"] / steps)
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("unet_steps", "vae_steps", "num_eval") if getattr(args, k) is not None}
    preset = Preset(**{**asdict(preset), **overrides})
    os.environ.setdefault("WANDB_MODE", "offline")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    work = args.workdir.resolve()
    out_dir = (args.out or work / "results").resolve()
    machine_at_start = machine()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    stages: list[Stage] = []
    start = time.perf_counter()
    try:
        eval_dir, vae_dir, runs = train_and_sample(args, preset, work, stages)
        rows, best = sample_and_score(args, preset, work, eval_dir, vae_dir, runs, stages, out_dir / "quality_grid.png")
    finally:
        torch.set_num_threads(previous_threads)   # callers in the same process keep their setting
    total = time.perf_counter() - start

    vae_text = f"VAE {preset.vae_steps} steps" if args.vae is None else f"VAE from {args.vae}"
    header = (f"Quality benchmark, preset `{args.preset}`: {preset.num_train} training / {preset.num_eval} held-out "
              f"shapes at {preset.image_size} px, {vae_text}, {'UNets' if args.arch == 'unet' else 'DiTs'} "
              f"conditioned on {({'text': 'captions', 'class': 'classes'}).get(args.cond, 'masks')}, "
              f"{preset.unet_steps} steps each, "
              f"{args.threads} thread(s); wall time {total / 60:.1f} min")
    table = markdown_table(rows)
    seconds = step_times(stages, runs, preset.unet_steps)
    summary, summary_table = seed_summary(rows, seconds)
    best_length = {v: min((r for r in summary if r["variant"] == v and r["ema_length"] and r["steps"] == 1),
                          key=lambda r: r["fd_pixels"]["mean"])["ema_length"]
                   for v in args.variants} if args.ema_lengths else {}
    if args.seeds > 1 or args.guidance or args.ema_lengths:
        table = (f"Mean over {args.seeds} training seed(s) (min-max); guidance 1 and each variant's best of "
                 f"{', '.join(f'{g:g}' for g in (1.0, *args.guidance))} (lowest 1-step FD pixels); seconds per "
                 f"training step from each train_unet.py run's wall time.\n\n{summary_table}\n\nEvery run:\n\n{table}")
    report = {"preset": args.preset, "arch": args.arch, "cond": args.cond, "settings": asdict(preset),
              "unet_overrides": args.unet_override, "variants": {v: VARIANTS[v] for v in args.variants},
              "seeds": args.seeds, "guidance": args.guidance, "best_guidance": best,
              "ema_lengths": args.ema_lengths, "best_ema_length": best_length,
              "seconds_per_step": seconds, "summary": summary,
              "threads": args.threads, "vae": str(vae_dir), "features": FEATURE_NOTES, "rows": rows,
              "stages": [asdict(s) for s in stages], "wall_time_s": total,
              "machine_at_start": machine_at_start, "machine_at_end": machine()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    legend = {"mask": LEGEND, "text": TEXT_LEGEND, "class": CLASS_LEGEND}[args.cond]
    (out_dir / "quality.md").write_text(header + "\n\n" + table + "\n\n" + legend + "\n")
    print("\n" + header + "\n\n" + table + "\n\n" + legend)
    print(f"\n[quality] results in {out_dir}", flush=True)
    return report


if __name__ == "__main__":
    main()
