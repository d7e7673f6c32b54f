"""Write the synthetic shapes data set (scripts/shapes.py) as an image folder.

Example: python scripts/make_example_data.py --out data/shapes --num-images 256 --size 64
The folder serves unconditional, class-conditional (circle / square / triangle), mask-conditional
(metadata.jsonl pairs every image with its mask) and text-conditional training (its "text" column
captions every image: "a red square on a striped background").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a plain script

from modules import durable  # noqa: E402
from scripts.shapes import BACKGROUNDS, LAYOUTS, make_shapes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to create (must be empty or absent)")
    parser.add_argument("--num-images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=LAYOUTS, default="imagefolder",
                        help="imagefolder: class folders + metadata.jsonl; flat: no labels, masks/ by name")
    parser.add_argument("--background", choices=BACKGROUNDS, default="textured",
                        help="textured: noise or stripes; plain: one light grey (the quickstart's easier set)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"{out} is not an empty folder; choose a new folder")
    try:   # built in OUT.tmp and renamed when complete: an interrupted run never leaves part of a data set
        durable.write_folder(out, lambda tmp: make_shapes(tmp, args.num_images, args.size, args.seed, args.layout,
                                                          args.background))
    except ValueError as e:
        parser.error(str(e))
    except durable.WRITE_ERRORS as e:
        parser.error(f"could not write {out} ({durable.write_failure(e)})")
    print(f"wrote {args.num_images} images of {args.size}x{args.size} px to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
