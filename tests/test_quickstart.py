"""The README's front door: ``python scripts/quickstart.py`` runs the whole example pipeline.

The real run takes about 5 minutes; here every stage runs 2 steps on 40 images (one UNet batch), which checks
what breaks a newcomer's first command (the presets it names, the stages' wiring, the grid).
"""
from __future__ import annotations

import sys

import numpy as np
from conftest import ROOT
from PIL import Image

sys.path.insert(0, str(ROOT / "scripts"))
import quickstart  # noqa: E402


def test_quickstart_writes_a_grid_of_the_held_out_masks_and_their_samples(tmp_path):
    out = tmp_path / "qs"
    assert quickstart.main(["--out", str(out), "--num-images", "40", "--vae-steps", "2", "--unet-steps", "2"]) == 0
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    size, pad, columns, rows = 32, 2, quickstart.IMAGES_PER_ROW, 1 + len(quickstart.STEP_COUNTS)
    assert grid.shape == (rows * (size + pad) + pad, columns * (size + pad) + pad, 3)
    masks = sorted((out / "held_out" / "masks").glob("*.png"))
    assert len(masks) == columns
    first = np.asarray(Image.open(masks[0]).convert("RGB"))
    np.testing.assert_array_equal(grid[pad:pad + size, pad:pad + size], first)
    for steps in quickstart.STEP_COUNTS:
        made = sorted(p.name for p in (out / f"samples_{steps}_steps").glob("*.png"))
        assert made == [m.name for m in masks]
