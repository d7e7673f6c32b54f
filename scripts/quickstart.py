"""The whole pipeline on the built-in example, in one command (about 5 minutes on 2 CPU cores).

    python scripts/quickstart.py                   # writes runs/quickstart/
    python scripts/quickstart.py --out DIR

1. example data: coloured circles, squares and triangles with their binary masks, on a plain
   background (the easier variant of the example set), and 12 held-out masks;
2. stage 1: ``train_vae.py --config quickstart`` (32 px images to 8x8x8 latents);
3. stage 2: ``train_unet.py --config quickstart``: a mask-conditioned shortcut model, the
   original request's mask-to-image use case (a class- or unconditional model needs far more
   than a few CPU minutes to draw clean shapes);
4. ``sample.py --masks`` at 1, 4 and 128 steps: ``OUT/grid.png`` shows the held-out masks in
   its first row, then one row per step count (same masks, same seeds).

Each stage is the real entry point (its command line is printed), run with ``--resume
latest``: interrupted, the same command continues where it stopped. A stage stopped by a signal
(SIGTERM, Ctrl-C: it saves a checkpoint and exits 0) stops the quickstart too, before the next
stage. The example data is written into a temporary folder and renamed into place once complete, so
an interrupted quickstart never trains on part of it.
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
from modules import durable  # noqa: E402
from modules.config.cli import run_cli  # noqa: E402
from modules.data.image_io import image_tensor, make_grid, save_png, to_uint8  # noqa: E402
from modules.run.checkpoint import unfinished  # noqa: E402
from scripts.shapes import make_shapes  # noqa: E402

STEP_COUNTS = (1, 4, 128)
IMAGES_PER_ROW = 12
TRAIN_SEED, HELD_OUT_SEED = 0, 1


def stage(name: str, script: str, main, argv: list[str]) -> bool:
    """Run one stage; False when a training stage was stopped before its last step (by a signal)."""
    print(f"\n== {name}: python {script} {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    run_cli(main, argv)
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if "--output-dir" in argv:
        problem = unfinished(Path(argv[argv.index("--output-dir") + 1]))
        if problem:
            print(f"== {name}: {problem}; the quickstart stops here: run the same command again to continue",
                  flush=True)
            return False
    return True


def example_data(folder: Path, num_images: int, **kwargs) -> bool:
    """Write the example data set to ``folder`` unless it is there; atomically (modules/durable.py: built in
    ``folder.tmp``, renamed when complete), so an interrupted write leaves no ``folder``."""
    if folder.exists():
        return False
    durable.write_folder(folder, lambda tmp: make_shapes(tmp, num_images, image_size=32, background="plain",
                                                         **kwargs))
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="folder for data, runs and samples")
    parser.add_argument("--num-images", type=int, default=1024, help="example images to make")
    parser.add_argument("--vae-steps", type=int, default=None, help="stage-1 steps (default: the preset's)")
    parser.add_argument("--unet-steps", type=int, default=None, help="stage-2 steps (default: the preset's)")
    args, extra = parser.parse_known_args(argv)
    out = Path(args.out)
    data, held_out = out / "data", out / "held_out"
    if example_data(data, args.num_images, seed=TRAIN_SEED):
        print(f"wrote {args.num_images} example images to {data}")
    example_data(held_out, IMAGES_PER_ROW, seed=HELD_OUT_SEED, layout="flat")
    masks = sorted((held_out / "masks").glob("*.png"))
    common = ["--report-to", "none", "--resume", "latest"]
    vae_steps = ["--max-steps", str(args.vae_steps)] if args.vae_steps else []
    unet_steps = ["--max-steps", str(args.unet_steps)] if args.unet_steps else []
    if not stage("stage 1 (VAE)", "train_vae.py", train_vae.main,
                 ["--config", "quickstart", "--data", str(data), "--output-dir", str(out / "vae"), *common,
                  *vae_steps]):
        return 0
    if not stage("stage 2 (UNet, mask-conditioned shortcut)", "train_unet.py", train_unet.main,
                 ["--config", "quickstart", "--data", str(data), "--vae", str(out / "vae"), "--output-dir",
                  str(out / "unet"), f"cache_dir={out / 'latent_cache'}", *common, *unet_steps, *extra]):
        return 0
    rows = [torch.stack([image_tensor(p) for p in masks])]
    for steps in STEP_COUNTS:
        folder = out / f"samples_{steps}_steps"
        stage(f"samples, {steps} step(s)", "sample.py", sample.main,
              ["--unet", str(out / "unet"), "--out", str(folder), "--masks", str(held_out / "masks"),
               "--steps", str(steps), "--overwrite"])
        rows.append(torch.stack([image_tensor(folder / p.name) for p in masks]))
    save_png(to_uint8(make_grid(rows)), out / "grid.png")
    print(f"\n{out / 'grid.png'}: the held-out masks, then one row per step count "
          f"({', '.join(map(str, STEP_COUNTS))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
