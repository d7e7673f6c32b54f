"""The stage-2 data path at scale: a latent store's build, start-up and read rate against the number of rows.

    python benchmarks/bench_data.py                      # N = 1k, 10k, 100k, 1M (about 10 minutes on 2 CPU cores)
    python benchmarks/bench_data.py --sizes 1000,10000 --read-rows 2000

For each N, with tiny latents (4x2x2) so that the store's bookkeeping dominates, not the encoder:
the build's wall time and peak memory (RSS of this process, sampled while it runs), the store's
size on disk, the start-up (opening the store: its index and every shard's file sizes and array
headers) to the first batch, and the full content check (every file's checksum, the ``verify``
command). Then, on a store of real 32x32x4 rows (``--read-rows``), latents/s read by one process
through the training loader (random order over the whole store, ``--workers`` loader workers, the
training default 2). The images and the VAE are stand-ins (the data set yields random tensors, the
"VAE" pools them): what is measured is what grows with N. Last, a power-law fit of each measure
against N (time ~ N^b), and its extrapolation to ImageNet's 1.28M rows at 256 px (32x32x4 latents).
"""
from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.data import latent_store  # noqa: E402
from modules.data.order import make_loader  # noqa: E402


class StandInImages(torch.utils.data.Dataset):
    """N "images" of ``side`` px (random, from the row's seed), three classes, keys like file names."""

    def __init__(self, n: int, side: int):
        self.n, self.side, self.training = n, side, False
        self.class_names = ["a", "b", "c"]
        self.labels = np.arange(n) % 3

    def __len__(self) -> int:
        return self.n

    def train(self, mode: bool = True):
        self.training = mode
        return self

    def key(self, i: int) -> str:
        return f"class_{i % 3}/{i:08d}.jpg"

    def fingerprint(self) -> str:
        return f"stand-in-{self.n}-{self.side}"

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.side, self.side, generator=g) * 2 - 1, "label": int(self.labels[i]),
                "index": i, "substituted": 0}


class StandInVAE:
    """An "encoder" whose posterior is an average pool of the image: latents of 4 x side/f x side/f."""

    def __init__(self, factor: int):
        self.factor = factor

    def encode(self, images: torch.Tensor):
        pooled = torch.nn.functional.avg_pool2d(images, self.factor)
        mean = torch.cat([pooled, pooled[:, :1]], dim=1)
        return type("Posterior", (), {"mean": mean, "std": mean.abs() + 0.1})()


class PeakRSS:
    """The process's peak resident memory during a block, sampled every 20 ms (MiB)."""

    def __enter__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def build(n: int, side: int, factor: int, root: Path, batch: int) -> tuple[Path, float, float]:
    dataset = StandInImages(n, side)
    spec = latent_store.StoreSpec(vae="stand-in", source=dataset.fingerprint(), image_size=side, hflip=True,
                                  masks=False, text=None, num_rows=n, class_names=tuple(dataset.class_names))
    folder = root / spec.name()
    with PeakRSS() as rss:
        start = time.perf_counter()
        latent_store.encode(StandInVAE(factor), latent_store.IndexedShards(dataset, latent_store.SHARD_ROWS, batch),
                            spec, folder, "cpu")
        seconds = time.perf_counter() - start
    return folder, seconds, rss.peak / 2 ** 20


def first_batch(folder: Path, batch: int, workers: int) -> float:
    start = time.perf_counter()
    store = latent_store.LatentStore(folder)
    next(iter(make_loader(store, batch, seed=0, num_workers=workers)))
    return time.perf_counter() - start


def read_rate(folder: Path, batch: int, workers: int, seconds: float) -> float:
    store = latent_store.LatentStore(folder)
    loader = iter(make_loader(store, batch, seed=0, num_workers=workers))
    next(loader)
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        rows += next(loader)["mean"].shape[0]
    return rows / (time.perf_counter() - start)


def fit(ns: list[int], values: list[float]) -> tuple[float, float]:
    """(a, b) of values ~ a N^b, least squares in log-log."""
    b, log_a = np.polyfit(np.log(ns), np.log(np.maximum(values, 1e-9)), 1)
    return math.exp(log_a), b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--read-rows", type=int, default=20000, help="rows of the 32x32x4 store the read rate uses")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (data.num_workers)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the read rate is measured")
    parser.add_argument("--dir", default=None, help="where the stores go (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_data_"))
    ns = [int(s) for s in args.sizes.split(",")]
    print(f"# {os.cpu_count()} CPUs; tiny 4x2x2 latents (bookkeeping); stores in {root}")
    print("| N | build s | build peak RSS MiB | store MiB | open to first batch s | verify s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    for n in ns:
        folder, seconds, peak = build(n, 8, 4, root, 1024)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20
        startup = first_batch(folder, args.batch, 0)
        start = time.perf_counter()
        assert latent_store.store_problem(folder, deep=True) is None
        verify = time.perf_counter() - start
        rows.append((n, seconds, peak, size, startup, verify))
        print(f"| {n} | {seconds:.2f} | {peak:.0f} | {size:.1f} | {startup:.3f} | {verify:.2f} |", flush=True)
        shutil.rmtree(folder)
    if len(ns) > 1:
        print("\nfitted growth (value ~ a N^b) and the extrapolation to N = 1.28M:")
        for i, name in ((1, "build s"), (2, "peak RSS MiB"), (4, "start-up s"), (5, "verify s")):
            a, b = fit([r[0] for r in rows], [r[i] for r in rows])
            print(f"  {name}: b = {b:.2f}, at 1.28M: {a * 1.28e6 ** b:.3g}")
    folder, seconds, _ = build(args.read_rows, 256, 8, root, 256)
    rate = read_rate(folder, args.batch, args.workers, args.seconds)
    store = latent_store.LatentStore(folder)
    start = time.perf_counter()
    for i in np.random.default_rng(0).integers(0, len(store), 2000):
        store[int(i)]
    one = (time.perf_counter() - start) / 2000
    print(f"\nreal 32x32x4 rows ({args.read_rows} rows, {seconds:.1f} s to build): one item {one * 1e6:.0f} us; "
          f"{rate:.0f} latents/s through the loader ({args.workers} workers, batch {args.batch}, random order)")
    print(f"peak RSS of the whole benchmark: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
