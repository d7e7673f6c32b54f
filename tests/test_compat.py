"""Models and checkpoints written by earlier code keep working: the exports of commit f0126e0 (the
layout before the four-layer restructuring: one flat model config holding the derived sizes) sample
the very same images, and its checkpoint resumes to the very same weights as that code's own
continuation. The fixture (tests/fixtures/f0126e0) was made by its make_fixture.py at that commit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import train_unet
from scripts.shapes import make_shapes
from scripts.tiny_clip import write_tiny_clip

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "f0126e0"
VAE = FIXTURE / "vae" / "vae"


@pytest.fixture(scope="module")
def old_inputs(tmp_path_factory) -> Path:
    """The data and the tiny CLIP the fixture was made with (the same arguments write the same files)."""
    root = tmp_path_factory.mktemp("compat")
    make_shapes(root / "shapes", 24, image_size=16, seed=0)
    write_tiny_clip(root / "clip", hidden=8, layers=1, heads=2, max_tokens=8)
    return root


@pytest.mark.parametrize("case, export, flags", [
    ("s_class1", "unet_class/unet_ema", ["--num-samples", "4", "--steps", "1"]),
    ("s_class2", "unet_class/unet_ema", ["--num-samples", "4", "--steps", "2", "--cfg-scale", "1.5"]),
    ("s_dit", "dit_meanflow_ema", ["--num-samples", "3", "--steps", "2"]),
    ("s_text", "unet_text_ema", ["--prompts", str(FIXTURE / "prompts.txt"), "--num-samples", "2", "--steps", "2",
                                 "--text-encoder", "{clip}"]),
])
def test_an_export_of_the_earlier_layout_samples_the_same_images(case, export, flags, old_inputs, tmp_path):
    flags = [f.format(clip=old_inputs / "clip") for f in flags]
    sample.main(["--unet", str(FIXTURE / export), "--vae", str(VAE), "--out", str(tmp_path / "s"), "--seed", "3",
                 "--batch-size", "3", "--device", "cpu", *flags])
    expected = json.loads((FIXTURE / "expected_samples.json").read_text())[case]
    assert sorted(p.name for p in (tmp_path / "s").glob("*.png")) == sorted(expected)
    for name, pixels in expected.items():
        assert np.array_equal(np.asarray(Image.open(tmp_path / "s" / name)), np.asarray(pixels, dtype=np.uint8)), name


def test_a_checkpoint_of_the_earlier_layout_resumes_to_the_same_weights(old_inputs, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "unet_class", out)
    train_unet.main(["--data", str(old_inputs / "shapes"), "--vae", str(FIXTURE / "vae"), "--output-dir", str(out),
                     "--report-to", "none", "--max-steps", "3", "--resume", "latest"])
    ours = load_file(out / "unet_ema" / "model.safetensors")
    theirs = load_file(FIXTURE / "unet_class_step3_ema.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    saved = json.loads((out / "config.json").read_text())
    assert "in_channels" not in saved["model"] and "num_classes" not in saved["cond"]   # written in today's layout
