"""What a checkpoint costs: the share of a save spent hashing, and a resume's check against plain reading.

A stage-2 checkpoint as ``train_unet.py`` writes it (``modules.run.checkpoint.Checkpointer``: Accelerate's
state with the Adam moments, the two EMAs, the manifest of every file's size and digest) of a network of a
``configs/unet`` preset. The save is timed whole and its manifest (the digests, ``durable.manifest``) on its
own; the resume check (``checkpoint_problem(deep=True)``, every file's digest) is timed against reading the
same files whole, both from the page cache, as on a resume right after a save::

    python benchmarks/bench_checkpoint.py --preset dit-b [--repeats 3] [--dir /fast/disk]

Prints a table and writes ``--json`` when given. CPU only: a checkpoint is written from host memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from modules import durable  # noqa: E402
from modules.config.io import load_config  # noqa: E402
from modules.config.schema import UNetRunConfig  # noqa: E402
from modules.core.ema import EMA  # noqa: E402
from modules.core.networks import build_network  # noqa: E402
from modules.core.networks.denoiser import NetworkInputs, Sizes, count_parameters  # noqa: E402
from modules.run.checkpoint import Checkpointer, RunIdentity, TrainingState, checkpoint_problem  # noqa: E402


def read_whole(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.readinto(BUFFER):
                    pass


BUFFER = bytearray(16 << 20)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dit-b", help="a configs/unet preset (default dit-b)")
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temporary folder)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    cfg = load_config(UNetRunConfig, "unet", args.preset, ["cond.type=class"])
    sizes = Sizes(latent_channels=4, latent_size=args.latent_size, image_downsample=8, num_classes=1000,
                  inputs=NetworkInputs())
    net = build_network(cfg.model, cfg.cond, sizes)
    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net, optimizer = accelerator.prepare(net, optimizer)
    net(torch.randn(2, 4, args.latent_size, args.latent_size), torch.rand(2),
        cond=torch.zeros(2, dtype=torch.long)).square().mean().backward()
    optimizer.step()     # the Adam moments exist, as in any checkpoint after step 1
    emas = {"sample": EMA(net, 0.9999, warmup=True), "teacher": EMA(net, 0.999, warmup=False)}

    def measure(digest) -> dict:
        """Median seconds of each part, with ``digest`` as the manifests' content digest."""
        timings: dict[str, list[float]] = {"save": [], "manifest": [], "check": [], "read": []}
        real_manifest, real_digest = durable.manifest, durable.digest_file

        def timed_manifest(folder, *a, **k):
            start = time.perf_counter()
            try:
                return real_manifest(folder, *a, **k)
            finally:
                timings["manifest"].append(time.perf_counter() - start)
        durable.manifest, durable.digest_file = timed_manifest, digest
        try:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                checkpointer = Checkpointer(accelerator, Path(tmp), keep=1, state=TrainingState(),
                                            identity=RunIdentity("bench", cfg, ("model",)), emas=emas)
                for step in range(1, args.repeats + 1):
                    start = time.perf_counter()
                    folder = checkpointer.save(step)
                    timings["save"].append(time.perf_counter() - start)
                    read_whole(folder)        # both measurements below start from the page cache
                    start = time.perf_counter()
                    read_whole(folder)
                    timings["read"].append(time.perf_counter() - start)
                    start = time.perf_counter()
                    assert checkpoint_problem(folder, deep=True) is None
                    timings["check"].append(time.perf_counter() - start)
                size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        finally:
            durable.manifest, durable.digest_file = real_manifest, real_digest
        med = {k: statistics.median(v) for k, v in timings.items()}
        return {"seconds": med, "bytes": size, "hash_share_of_save": med["manifest"] / med["save"],
                "check_over_read": med["check"] / med["read"]}

    # Side by side in one process: the digest manifests use now, and the single-thread SHA-256 they used before.
    rows = {"XXH3-128 blocks, threaded (now)": measure(durable.digest_file),
            "SHA-256, one thread (before)": measure(durable.sha256_file)}
    result = {"preset": args.preset, "parameters": count_parameters(net), "cpus": os.cpu_count(), "rows": rows}
    size = next(iter(rows.values()))["bytes"]
    print(f"preset {args.preset}: {result['parameters'] / 1e6:.1f}M parameters, checkpoint {size / 1e9:.2f} GB "
          f"(weights, Adam moments, two EMAs), {os.cpu_count()} CPUs, median of {args.repeats}")
    print("| digest | save | of which digests | share | resume check | reading the files | check / read |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in rows.items():
        med = row["seconds"]
        print(f"| {name} | {med['save']:.2f} s | {med['manifest']:.2f} s | {row['hash_share_of_save']:.0%} | "
              f"{med['check']:.2f} s | {med['read']:.2f} s | {row['check_over_read']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
