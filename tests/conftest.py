"""Shared pytest fixtures: a small synthetic shapes data set on disk."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Trackers never touch the network in tests; subprocesses inherit these.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models on 2 cores: one thread each is faster, and does not collapse when another
# process holds a core (OpenMP threads spin-wait). Subprocesses inherit the variable.
os.environ["OMP_NUM_THREADS"] = "1"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from scripts.shapes import make_shapes  # noqa: E402

torch.set_num_threads(1)

SHAPES_NUM_IMAGES = 24
SHAPES_IMAGE_SIZE = 32


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    """24 shapes images of 32x32 px in class folders circle/ square/ triangle/ (8 each, labels
    0, 1, 2), with masks paired through metadata.jsonl (file_name, mask_file_name, label).
    Session-wide and shared: do not write into it."""
    return make_shapes(tmp_path_factory.mktemp("shapes") / "shapes", SHAPES_NUM_IMAGES,
                       image_size=SHAPES_IMAGE_SIZE, seed=0)


@pytest.fixture(scope="session")
def tiny_vae_run(shapes_dir, tmp_path_factory) -> Path:
    """A train_vae.py output dir: the tiny VAE trained for a few steps on ``shapes_dir``."""
    import train_vae
    out = tmp_path_factory.mktemp("vae_run") / "vae"
    train_vae.main(["--config", "tiny", "--data", str(shapes_dir), "--output-dir", str(out), "--report-to", "none",
                    "--max-steps", "30", "train.checkpoint_every=30", "train.val_every=30", "train.image_log_every=30",
                    "scale_samples=8"])
    return out


@pytest.fixture(scope="session")
def tiny_unet_run(shapes_dir, tiny_vae_run, tmp_path_factory) -> Path:
    """A train_unet.py output dir: a class-conditional tiny shortcut model (3 classes, M = 8)."""
    import train_unet
    out = tmp_path_factory.mktemp("unet_run") / "unet"
    train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                     str(out), "--report-to", "none", "--max-steps", "6", "cond.type=class",
                     "train.checkpoint_every=6", "train.image_log_every=6"])
    return out


IMF_RUN_ARGS = ("--config", "imf-tiny", "--report-to", "none", "cond.type=class", "train.checkpoint_every=2",
                "train.image_log_every=100", "train.log_every=2")


@pytest.fixture(scope="session")
def tiny_imf_run(shapes_dir, tiny_vae_run, tmp_path_factory) -> Path:
    """A train_unet.py output dir: class-conditional iMF on the tiny in-context DiT (imf-tiny, 3 classes), 4 steps."""
    import train_unet
    out = tmp_path_factory.mktemp("imf_run") / "imf"
    train_unet.main([*IMF_RUN_ARGS, "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir", str(out),
                     "--max-steps", "4", f"cache_dir={out.parent / 'cache'}"])
    return out
