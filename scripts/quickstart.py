"""The whole pipeline on the built-in example, in one command (about 5 minutes on 2 CPU cores).

    python scripts/quickstart.py                   # writes runs/quickstart/
    python scripts/quickstart.py --out DIR

1. example data: coloured circles, squares and triangles on textured backgrounds (3 classes);
2. stage 1: ``train_vae.py --config quickstart``;
3. stage 2: ``train_unet.py --config quickstart`` (a class-conditional shortcut model);
4. ``sample.py`` at 1, 4 and 128 steps, the same seeds and classes in each: ``OUT/grid.png``
   shows one row per step count.

Each stage is the real entry point (its command line is printed), run with ``--resume
latest``: interrupted, the same command continues where it stopped.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

import sample  # noqa: E402
import train_unet  # noqa: E402
import train_vae  # noqa: E402
from modules.cli import run_cli  # noqa: E402
from modules.image_io import image_tensor, make_grid, save_png, to_uint8  # noqa: E402
from modules.synthetic import make_shapes  # noqa: E402

STEP_COUNTS = (1, 4, 128)
IMAGES_PER_ROW = 12


def stage(name: str, script: str, main, argv: list[str]) -> None:
    print(f"\n== {name}: python {script} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    run_cli(main, argv)
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, runs and samples")
    parser.add_argument("--num-images", type=int, default=1024, help="example images to make")
    parser.add_argument("--vae-steps", type=int, default=None, help="stage-1 steps (default: the preset's)")
    parser.add_argument("--unet-steps", type=int, default=None, help="stage-2 steps (default: the preset's)")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    data = out / "data"
    if not data.exists():
        make_shapes(data, args.num_images, image_size=32, seed=0)
        print(f"wrote {args.num_images} example images to {data}")
    common = ["--report-to", "none", "--resume", "latest"]
    vae_steps = ["--max-steps", str(args.vae_steps)] if args.vae_steps else []
    unet_steps = ["--max-steps", str(args.unet_steps)] if args.unet_steps else []
    stage("stage 1 (VAE)", "train_vae.py", train_vae.main,
          ["--config", "quickstart", "--data", str(data), "--output-dir", str(out / "vae"), *common, *vae_steps])
    stage("stage 2 (UNet, shortcut)", "train_unet.py", train_unet.main,
          ["--config", "quickstart", "--data", str(data), "--vae", str(out / "vae"), "--output-dir",
           str(out / "unet"), f"cache_dir={out / 'latent_cache'}", *common, *unet_steps, *extra])
    rows = []
    for steps in STEP_COUNTS:
        folder = out / f"samples_{steps}_steps"
        stage(f"samples, {steps} step(s)", "sample.py", sample.main,
              ["--unet", str(out / "unet"), "--out", str(folder), "--num-samples", str(IMAGES_PER_ROW),
               "--steps", str(steps), "--overwrite"])
        rows.append(torch.stack([image_tensor(p) for p in sorted(folder.glob("0*.png"))]))
    save_png(to_uint8(make_grid(rows)), out / "grid.png")
    print(f"\n{out / 'grid.png'}: one row per step count ({', '.join(map(str, STEP_COUNTS))}), "
          "classes circle, square, triangle in turn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
