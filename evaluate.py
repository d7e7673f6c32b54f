"""Evaluation entry point: FID between image folders or against saved statistics.

    python evaluate.py fid --inception inception-2015-12-05.pt samples/ data/train/
    python evaluate.py fid --inception inception-2015-12-05.pt samples/ train_stats.npz
    python evaluate.py stats --inception inception-2015-12-05.pt data/train/ --out train_stats.npz

Images: the files of a sample.py manifest or an imagefolder metadata file, else every PNG/JPEG
under the folder (recursively, sorted); converted to RGB and resized to 299x299 with
clean-fid's float bicubic filter; see modules/metrics.py. The FID is printed on stdout.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from modules.errors import MetricsError
from modules.metrics import (INCEPTION_URL, feature_statistics, folder_features, frechet_distance, load_inception,
                             load_stats, save_stats)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception", required=True, metavar="PATH",
                        help=f"local TorchScript inception-2015-12-05.pt (from {INCEPTION_URL})")
    parser.add_argument("--inception-sha256", default=None, metavar="HEX",
                        help="the SHA-256 the Inception file must have (a TorchScript file runs code when loaded)")
    parser.add_argument("--trust-inception-code", action="store_true",
                        help="load the Inception file without checking its SHA-256: this runs its code")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--image-size", type=int, default=299,
                        help="images are resized to this square size before the extractor (default 299)")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="FID evaluation of image folders.")
    sub = parser.add_subparsers(dest="command", required=True)
    fid = sub.add_parser("fid", help="FID between FOLDER_A and FOLDER_B or a saved STATS.npz")
    _add_common(fid)
    fid.add_argument("folder_a", metavar="FOLDER_A", help="image folder (e.g. generated samples)")
    fid.add_argument("reference", metavar="FOLDER_B|STATS.npz", help="image folder or statistics file")
    fid.add_argument("--save-stats", metavar="OUT.npz", help="also save FOLDER_A's statistics")
    stats = sub.add_parser("stats", help="save the feature statistics of an image folder")
    _add_common(stats)
    stats.add_argument("folder", metavar="FOLDER")
    stats.add_argument("--out", required=True, metavar="OUT.npz")
    return parser


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MetricsError("--device cuda: no CUDA device is available (use --device cpu)")
    return torch.device(name)


def _stats(folder: str, extractor, args: argparse.Namespace, device: torch.device):
    feats = folder_features(folder, extractor, args.batch_size, device, args.image_size, args.workers)
    return feature_statistics(feats)


def writable(out: Path) -> None:
    """Refuse a statistics file that could not be written, before the (slow) feature extraction."""
    if out.suffix != ".npz":
        raise MetricsError(f"statistics file {out}: must end in .npz")
    probe = out.with_name(f".{out.name}.probe")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise MetricsError(f"statistics file {out}: cannot be written ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> None:
    if args.image_size < 1:
        raise MetricsError(f"--image-size must be >= 1, got {args.image_size}")
    device = _device(args.device)
    # Check every input path before the (slow) feature extraction starts.
    folders = [args.folder_a] if args.command == "fid" else [args.folder]
    reference_is_stats = args.command == "fid" and args.reference.endswith(".npz")
    if args.command == "fid":
        if reference_is_stats:
            reference = load_stats(args.reference)
        else:
            folders.append(args.reference)
    for folder in folders:
        if not Path(folder).is_dir():
            raise MetricsError(f"image folder {folder} not found")
    out = args.out if args.command == "stats" else args.save_stats
    if out:
        writable(Path(out))
    extractor = load_inception(args.inception, device, args.inception_sha256, args.trust_inception_code)

    stats_a = _stats(folders[0], extractor, args, device)
    if args.command == "stats":
        print(f"wrote {save_stats(args.out, *stats_a)}")
        return
    if args.save_stats:
        save_stats(args.save_stats, *stats_a)
    if not reference_is_stats:
        reference = _stats(args.reference, extractor, args, device)
    if reference[0].shape != stats_a[0].shape:
        raise MetricsError(f"{args.reference} has {reference[0].shape[0]}-d features but the extractor "
                           f"gives {stats_a[0].shape[0]}-d: statistics from a different network")
    print(f"{frechet_distance(*stats_a, *reference):.6f}")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except MetricsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
