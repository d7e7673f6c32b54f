"""evaluate.py's arithmetic at scale: precision/recall and FID's statistics, before and after issue 22.

    python benchmarks/bench_eval.py                                  # 3 to 6 minutes on 2 CPU cores
    python benchmarks/bench_eval.py --device cuda --pr-sizes 10000,50000 --fid-sizes 50000,200000

For each N (feature vectors of Inception's width, 2048, non-negative and correlated like pool_3's), every case
runs in a fresh process: its wall time and its peak memory above what its inputs take (the process's peak RSS,
reset once the inputs are made; on CUDA, torch's peak allocation), and the numbers it gives, which must agree:

* precision/recall (k = 3), N real against N generated. ``before``: the code before issue 22 (a float64 copy of
  both sets on the CPU, distances 1024 rows x N at a time, whatever ``--device``); ``after``:
  ``modules.core.metrics.precision_recall`` (float32 on ``--device``, 4096 x 4096 tiles).
* FID statistics (mu, sigma) of N feature vectors. ``before``: float64 features (as extraction kept them) and
  ``np.cov``; ``after``: float32 features (as extraction keeps them now) added 50 rows at a time to
  ``FeatureMoments`` (as extraction adds its batches, on ``--device``; folded into the float64 sums every 1024
  rows). The features themselves (N x D x 8 bytes before,
  x 4 after) are inputs, not counted in the peak.

Last, a power-law fit of each time against N (time ~ N^b; small N are dominated by fixed costs) and an
extrapolation to 50 000 samples from the largest N measured, as N^2 for precision/recall and N for the
statistics.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modules.core.metrics import FeatureMoments, precision_recall  # noqa: E402

WIDTH = 2048
K = 3


def features(n: int, width: int, seed: int, dtype) -> np.ndarray:
    """Non-negative correlated float32 feature vectors with a mean near their spread (in ``dtype``: float64 holds
    the same values, as extraction's float64 copies did), made a block at a time so that making them does not
    raise the peak much above what they take."""
    basis = np.random.default_rng(0).normal(size=(16, width)) * 0.2        # one distribution for every seed
    rng = np.random.default_rng(seed)
    out = np.empty((n, width), dtype)
    for start in range(0, n, 4096):
        rows = min(4096, n - start)
        out[start:start + rows] = np.maximum(rng.normal(size=(rows, 16)) @ basis
                                             + rng.normal(size=(rows, width)) * 0.3 + 0.3, 0).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- the code before issue 22

def previous_precision_recall(real: np.ndarray, generated: np.ndarray, k: int = 3,
                              block: int = 1024) -> tuple[float, float]:
    """modules/core/metrics.py at 4b1240f, transcribed: float64 copies, 1024 x N distances at a time."""
    def radii(x):
        return torch.cat([torch.cdist(x[s:s + block], x).kthvalue(k + 1, dim=1).values
                          for s in range(0, x.shape[0], block)])

    def within_any(points, centres, r):
        return torch.cat([(torch.cdist(points[s:s + block], centres) <= r[None, :]).any(dim=1)
                          for s in range(0, points.shape[0], block)])
    r, g = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(generated, dtype=torch.float64)
    precision = within_any(g, r, radii(r)).double().mean()
    recall = within_any(r, g, radii(g)).double().mean()
    return float(precision), float(recall)


def previous_statistics(features64: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """feature_statistics at 4b1240f: np.mean and np.cov of the float64 features."""
    return features64.mean(axis=0), np.cov(features64, rowvar=False)


# ----------------------------------------------------------------------------- one case, in its own process

def reset_peak() -> int:
    """Resets the process's peak RSS (Linux: /proc/self/clear_refs) and returns the RSS now, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss("VmRSS")


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_case(case: str, n: int, width: int, device: str) -> dict:
    dtype = np.float64 if case.endswith("before") else np.float32
    real = features(n, width, seed=1, dtype=dtype)
    generated = features(n, width, seed=2, dtype=dtype) * np.asarray(0.9, dtype) if case.startswith("pr") else None
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = reset_peak()
    start = time.perf_counter()
    if case == "pr_before":
        numbers = previous_precision_recall(real, generated, K)
    elif case == "pr_after":
        numbers = precision_recall(real, generated, K, device=device)
    elif case == "fid_before":
        numbers = previous_statistics(real)
    else:
        moments = FeatureMoments(width, device)
        for s in range(0, n, 50):
            moments.add(torch.from_numpy(real[s:s + 50]).to(device))
        numbers = moments.statistics()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda and case.endswith("after") else rss("VmHWM") - base
    if case.startswith("fid"):
        mu, sigma = numbers
        numbers = [float(mu.sum()), float(np.trace(sigma)), float(np.abs(sigma).sum())]
    return {"case": case, "n": n, "width": width, "device": device if case.endswith("after") else "cpu",
            "seconds": seconds, "peak_bytes": int(peak), "numbers": list(numbers),
            "inputs_bytes": int(real.nbytes + (generated.nbytes if generated is not None else 0))}


def in_own_process(case: str, n: int, width: int, device: str, threads: int) -> dict:
    command = [sys.executable, __file__, "--case", case, "--n", str(n), "--width", str(width), "--device", device,
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def fit(rows: list[dict]) -> tuple[float, float]:
    """(b, a) of seconds ~ a N^b, least squares in log-log."""
    x = np.log([r["n"] for r in rows])
    y = np.log([max(r["seconds"], 1e-9) for r in rows])
    b, log_a = np.polyfit(x, y, 1) if len(rows) > 1 else (float("nan"), y[0])
    return float(b), float(math.exp(log_a))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pr-sizes", default="1000,2000,5000,10000")
    parser.add_argument("--fid-sizes", default="10000,50000")
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-before-above", type=int, default=10 ** 9,
                        help="time the code before issue 22 only up to this N (it grows as N^2 in float64)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(run_case(args.case, args.n, args.width, args.device)))
        return {}
    rows = []
    for kind, sizes in (("pr", args.pr_sizes), ("fid", args.fid_sizes)):
        for n in (int(s) for s in sizes.split(",") if s):
            for when in ("before", "after"):
                if when == "before" and n > args.skip_before_above:
                    continue
                rows.append(in_own_process(f"{kind}_{when}", n, args.width, args.device, args.threads))
                print(json.dumps(rows[-1]), file=sys.stderr)
    agree = {}
    for row in rows:
        if row["case"].endswith("after"):
            before = [r for r in rows if r["case"] == row["case"].replace("after", "before") and r["n"] == row["n"]]
            if before:
                agree[(row["case"][:-6], row["n"])] = float(np.max(np.abs(np.subtract(before[0]["numbers"],
                                                                                       row["numbers"]))
                                                                    / np.maximum(np.abs(before[0]["numbers"]), 1e-300)))
    print("| what | N | code | device | seconds | peak above inputs (MiB) | inputs (MiB) | numbers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        what, when = row["case"].split("_")
        numbers = ", ".join(f"{v:.6g}" for v in row["numbers"])
        print(f"| {'precision/recall' if what == 'pr' else 'FID statistics'} | {row['n']} | {when} | {row['device']} | "
              f"{row['seconds']:.2f} | {row['peak_bytes'] / 2 ** 20:.0f} | {row['inputs_bytes'] / 2 ** 20:.0f} | "
              f"{numbers} |")
    fits = {}
    for case in sorted({r["case"] for r in rows}):
        measured = [r for r in rows if r["case"] == case]
        b, _ = fit(measured)
        largest = max(measured, key=lambda r: r["n"])
        power = 2 if case.startswith("pr") else 1       # N^2 distances; N products of D x D
        at_50k = largest["seconds"] * (50000 / largest["n"]) ** power
        fits[case] = {"exponent": b, "seconds_at_50000": at_50k}
        print(f"{case}: measured time ~ N^{b:.2f}; at N = 50 000: {at_50k:.0f} s (extrapolated as N^{power} from "
              f"N = {largest['n']})")
    for (what, n), difference in sorted(agree.items()):
        print(f"{what} at N = {n}: before and after differ by {difference:.1e} (largest relative difference)")
    return {"rows": rows, "fits": fits, "agreement": {f"{w}_{n}": d for (w, n), d in agree.items()}}


if __name__ == "__main__":
    main()
