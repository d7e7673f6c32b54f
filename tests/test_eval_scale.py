"""evaluate.py at 50k samples and million-image references: FID's statistics as float64 sums of float32 features
(the same numbers as scipy's float64 FID), precision/recall in tiles on a device (the same as a brute-force
count), KID from subsets of a memory map, the Inception Score's splits, and the statistics reduced over
processes instead of gathering every feature (two gloo ranks against one process)."""
from __future__ import annotations

import socket
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch

from modules.core.metrics import (FeatureMoments, feature_statistics, frechet_distance, inception_score,
                                  kernel_inception_distance, precision_recall)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def inception_like(n: int, width: int, seed: int, shift: float = 0.3) -> np.ndarray:
    """Non-negative, correlated float32 features with a mean near their spread, like Inception's pool_3."""
    rng = np.random.default_rng(seed)
    mixed = rng.normal(size=(n, 8)) @ rng.normal(size=(8, width)) * 0.2 + rng.normal(size=(n, width)) * 0.3
    return np.maximum(mixed + shift, 0).astype(np.float32)


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula on float64 copies: np.cov and scipy.linalg.sqrtm of the product."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- FID statistics

def test_fid_from_batched_float32_moments_equals_scipys_float64_fid():
    """The moments summed batch by batch from float32 rows (as extraction sums them) give pytorch-fid's FID
    (float64 copies, np.cov, scipy's sqrtm) within 1e-9 relative: summing in float64 loses nothing."""
    a, b = inception_like(3000, 64, seed=1), inception_like(2500, 64, seed=2, shift=0.35)
    moments = FeatureMoments(64)
    for start in range(0, len(a), 50):
        moments.add(torch.from_numpy(a[start:start + 50]))
    mu, sigma = moments.statistics()
    np.testing.assert_allclose(mu, a.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a.astype(np.float64), rowvar=False), rtol=0, atol=1e-13)
    ours = frechet_distance(mu, sigma, *feature_statistics(b))
    assert ours == pytest.approx(scipy_fid(a, b), rel=1e-9)


def test_statistics_keep_their_digits_when_the_mean_dwarfs_the_spread():
    """E[x x^T] - mu mu^T cancels: with a mean 1000 times the spread a float32 sum would keep no digit of the
    covariance; the float64 sums keep it to 1e-8."""
    rng = np.random.default_rng(0)
    features = (1000 + rng.normal(size=(20000, 16))).astype(np.float32)
    exact = np.cov(features.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(FeatureMoments.of(features, block=999).statistics()[1], exact, rtol=0,
                               atol=1e-8 * np.abs(exact).max())


# ----------------------------------------------------------------------------- precision and recall, KID, IS

def brute_force(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float, float]:
    """Precision, recall (float64, every distance at once) and how near the nearest point is to a ball's
    surface, relative to its radius."""
    def radii(x):
        return np.sort(np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)), axis=1)[:, k]

    def inside(points, centres, r):
        d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
        return (d <= r[None]).any(axis=1).mean(), np.abs(d / r[None] - 1).min()
    real, fake = real.astype(np.float64), fake.astype(np.float64)
    (precision, near_p), (recall, near_r) = inside(fake, real, radii(real)), inside(real, fake, radii(fake))
    return float(precision), float(recall), float(min(near_p, near_r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block", [64, 4096])
def test_precision_recall_in_tiles_on_a_device_equals_a_brute_force_count(device, block):
    """Tiles of 64 x 64 distances (the k nearest carried across tiles) count exactly what all N x N float64
    distances at once count. No point of this data lies within 1e-5 of a ball's surface, where float32
    distances (about 1e-7 relative) could count it either way."""
    real = inception_like(400, 8, seed=3)
    fake = np.concatenate([inception_like(250, 8, seed=4) * 0.5, inception_like(50, 8, seed=5) + 1])
    precision, recall, nearest = brute_force(real, fake, k=3)
    assert nearest > 1e-5
    assert precision_recall(real, fake, k=3, device=device, block=block) == (precision, recall)
    assert 0.6 < precision <= 250 / 300 and recall < 0.5    # the junk lowers precision, the narrowness recall


def test_kid_takes_its_subsets_from_a_memory_map(tmp_path):
    """A reference's features are a read-only memory map; KID copies only its subsets, and gives the numbers
    it gives on float64 copies of the whole sets (the same subsets, the same float64 arithmetic)."""
    a, b = inception_like(1500, 16, seed=6), inception_like(1200, 16, seed=7, shift=0.4)
    path = tmp_path / "features.npy"
    np.save(path, a)
    mapped = np.load(path, mmap_mode="r")
    on_maps = kernel_inception_distance(mapped, b, num_subsets=20, max_subset_size=500)
    on_copies = kernel_inception_distance(torch.from_numpy(a.astype(np.float64)), b.astype(np.float64),
                                          num_subsets=20, max_subset_size=500)
    assert on_maps == pytest.approx(on_copies, rel=1e-12)


def improved_gan_inception_score(preds: np.ndarray, splits: int) -> tuple[float, float]:
    """openai/improved-gan inception_score/model.py, get_inception_score, transcribed."""
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits):((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("n", [12, 25, 1003, 1000])
def test_inception_score_splits_as_the_original_code(n):
    """Parts at i*N//splits, also when N is not a multiple of the splits (torch.chunk made 6 parts of 2 at
    N = 12, and unequal parts at N = 25)."""
    rng = np.random.default_rng(n)
    logits = rng.normal(size=(n, 10)) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert inception_score(probabilities, splits=10) == pytest.approx(
        improved_gan_inception_score(probabilities, 10), rel=1e-12)


# ----------------------------------------------------------------------------- several processes

def _reduce_worker(rank: int, port: int, features: np.ndarray, probabilities: np.ndarray, results) -> None:
    import os

    import torch.distributed as dist

    from modules.eval.features import Features, share
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state = SimpleNamespace(num_processes=2, process_index=rank, is_main_process=rank == 0)
        mine = features[rank::2]                # the rows extract() gives this process
        moments = FeatureMoments(mine.shape[1] if len(mine) else 0)
        if len(mine):
            moments.add(torch.from_numpy(mine))
        local = Features(mine if len(mine) else np.zeros((0, 0), np.float32),
                         probabilities[rank::2] if len(mine) else None, moments, frozenset({(8, 8 + rank)}))
        shared = share(local, state)
        rows, probs, digest = shared.all_rows(), shared.all_probabilities(), shared.digest()
        results.put((rank, shared.count, shared.statistics() if shared.count > 1 else None, shared.sizes,
                     len(shared.rows), rows, probs, digest))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)     # as in tests/test_ema.py: no interpreter teardown under gloo's threads


@pytest.mark.parametrize("n", [7, 1])
def test_two_gloo_processes_reduce_the_statistics_of_one_and_gather_only_on_the_main_one(n):
    """Each rank keeps its rows; the moments are all-reduced (both ranks get the one-process statistics, to
    1e-12), the rows and probabilities reach the main rank only, in the set's order, and the features' digest
    is the one-process digest. n = 1: a rank with no row."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    from modules.eval.features import Features
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    features, probabilities = inception_like(n, 6, seed=8), inception_like(n, 3, seed=9)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(_reduce_worker, args=(port, features, probabilities, results), nprocs=2)
    got = dict((r[0], r[1:]) for r in (results.get(), results.get()))
    one = Features(features, probabilities, FeatureMoments.of(features))
    for rank, (count, statistics, sizes, kept, rows, probs, digest) in got.items():
        assert count == n and sizes == {(8, 8), (8, 9)} and kept == len(features[rank::2])
        if n > 1:
            for reduced, single in zip(statistics, one.statistics()):
                np.testing.assert_allclose(reduced, single, rtol=0, atol=1e-12 * np.abs(single).max())
        assert digest == one.digest()
        if rank == 0:
            np.testing.assert_array_equal(rows, features)
            np.testing.assert_array_equal(probs, probabilities)
        else:
            assert rows is None and probs is None
