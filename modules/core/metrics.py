"""Evaluation metrics over features and images: FID, KID, precision and recall, Inception Score,
PSNR and mask IoU. Where the features come from is modules/eval/features.py.

Features arrive as float32 rows and are never copied whole into float64: FID's statistics are
sums over batches of rows (:class:`FeatureMoments`, float64 sums of size D and D x D whatever
the number of rows), KID converts each random subset to float64, and precision/recall computes
its distances in float32 tiles on the device it is given. The Frechet distance itself, the
subsets' kernels and the Inception Score are float64; every random choice (KID's subsets) is
seeded.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

from modules.errors import MetricsError

Array = Union[np.ndarray, torch.Tensor]
Device = Union[str, torch.device, None]


# ----------------------------------------------------------------------------- Frechet distance

def _as_float64(x: Array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach().cpu(),
                           dtype=torch.float64)


def _sym_sqrt(m: torch.Tensor) -> torch.Tensor:
    # Covariances are symmetric PSD; tiny negative eigenvalues are rounding noise.
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: Array, sigma1: Array, mu2: Array, sigma2: Array) -> float:
    """``||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr(sqrt(s1 s2))`` in float64.

    ``tr(sqrt(s1 s2))`` is the sum of square roots of the eigenvalues of the symmetric PSD
    matrix ``sqrt(s1) s2 sqrt(s1)`` (same spectrum as ``s1 s2``), which avoids the complex
    round-off of a general matrix square root.
    """
    mu1, mu2, s1, s2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise MetricsError(f"frechet_distance: shapes do not match a {d}-d feature space: mu1 "
                           f"{tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, mu2 {tuple(mu2.shape)}, "
                           f"sigma2 {tuple(s2.shape)}")
    root1 = _sym_sqrt(s1)
    inner = root1 @ s2 @ root1
    tr_covmean = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * tr_covmean)


class FeatureMoments:
    """FID's statistics as sums that add over batches and over processes: the number of feature
    vectors, their sum and the sum of their outer products, on the device the features are made on.

    Rows are kept as they come (float32) until ``fold_rows`` of them are there; then their sum and
    their products are taken in float64, in one matrix product, and added to float64 sums of size
    [D] and [D, D] whatever the number of rows (32 MiB at D = 2048). So a million rows neither cost
    a float64 copy of the features nor lose the digits that the difference of traces in FID needs
    (``E[x x^T] - mu mu^T`` cancels), the product is as fast per row as np.cov's, and no device's
    TF32 setting applies. The products cost 4 D^2 flops per image against Inception's 11 GFLOP.
    """

    def __init__(self, width: int, device: Device = "cpu", fold_rows: int = 1024):
        self.count = 0
        self.fold_rows = fold_rows
        self._total = torch.zeros(width, dtype=torch.float64, device=device)
        self._outer = torch.zeros(width, width, dtype=torch.float64, device=device)
        self._pending: list[torch.Tensor] = []

    @classmethod
    def of(cls, features: Array, block: int = 8192, device: Device = None) -> "FeatureMoments":
        """The moments of ``features`` [N, D] (an array, a memory map or a tensor), a block of rows at a time."""
        rows = _as_rows(features)
        moments = cls(rows.shape[1], device or (rows.device if isinstance(rows, torch.Tensor) else "cpu"))
        for start in range(0, rows.shape[0], block):
            moments.add(_take(rows, slice(start, start + block), moments.device, torch.float64))
        return moments

    @property
    def width(self) -> int:
        return self._total.shape[0]

    @property
    def device(self) -> torch.device:
        return self._total.device

    def add(self, batch: torch.Tensor) -> None:
        """Adds a batch of feature vectors [B, D] (any float dtype, any device)."""
        rows = batch.detach().reshape(batch.shape[0], -1)
        if rows.shape[1] != self.width:
            raise MetricsError(f"{rows.shape[1]}-d features added to {self.width}-d moments")
        self.count += rows.shape[0]
        self._pending.append(rows)
        if sum(len(r) for r in self._pending) >= self.fold_rows:
            self._fold()

    def _fold(self) -> None:
        if self._pending:
            rows = torch.cat([r.to(self.device, torch.float64) for r in self._pending])
            self._pending = []
            self._total += rows.sum(dim=0)
            self._outer.addmm_(rows.T, rows)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The sum and the sum of outer products (float64, on the device) of every row added: what several
        processes all-reduce, in place."""
        self._fold()
        return self._total, self._outer

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and covariance (unbiased, like np.cov), float64 on the CPU."""
        n = self.count
        if n < 2:
            raise MetricsError(f"feature statistics need at least 2 feature vectors [N, D], got {n}")
        total, outer = self.sums()
        mu = total / n
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), ((sigma + sigma.T) / 2).cpu().numpy()


def feature_statistics(features: Array) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, like np.cov) of ``features`` [N, D], float64."""
    rows = _as_rows(features)
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise MetricsError(f"feature statistics need at least 2 feature vectors [N, D], got shape "
                           f"{tuple(rows.shape)}")
    return FeatureMoments.of(rows).statistics()


# ----------------------------------------------------------------------------- KID, precision and recall, IS

def _as_rows(x: Array) -> Union[np.ndarray, torch.Tensor]:
    """Feature vectors as given (a tensor, an array or a memory map), without a copy."""
    return x.detach() if isinstance(x, torch.Tensor) else np.asarray(x)


def _take(rows: Union[np.ndarray, torch.Tensor], index, device: Device, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``index`` (a slice or indices) as a ``dtype`` tensor on ``device``: only they are copied."""
    if isinstance(rows, torch.Tensor):
        return rows[index].to(device, dtype)
    picked = np.ascontiguousarray(rows[index.numpy() if isinstance(index, torch.Tensor) else index])
    if not picked.flags.writeable:          # rows of a read-only memory map: torch wants its own copy
        picked = picked.copy()
    return torch.from_numpy(picked).to(device, dtype)


def _checked(x: Array, what: str) -> Union[np.ndarray, torch.Tensor]:
    rows = _as_rows(x)
    if rows.ndim != 2 or rows.shape[0] < 2:
        raise MetricsError(f"{what}: expected at least 2 feature vectors [N, D], got shape {tuple(rows.shape)}")
    return rows


def kernel_inception_distance(features_a: Array, features_b: Array, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0,
                              device: Device = None) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3,
    averaged over random subsets of equal size (clean-fid's defaults); returns (mean, standard
    error of the mean over the subsets). Each subset is copied to ``device`` in float64; the sets
    themselves (arrays, memory maps or tensors) are not copied."""
    a, b = _checked(features_a, "KID"), _checked(features_b, "KID")
    if a.shape[1] != b.shape[1]:
        raise MetricsError(f"KID: {a.shape[1]}-d and {b.shape[1]}-d features: different extractors")
    d, m = a.shape[1], min(a.shape[0], b.shape[0], max_subset_size)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        x = _take(a, torch.randperm(a.shape[0], generator=generator)[:m], device, torch.float64)
        y = _take(b, torch.randperm(b.shape[0], generator=generator)[:m], device, torch.float64)
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(within - 2 * kxy.sum() / (m * m)))
    mean = float(np.mean(values))
    error = float(np.std(values, ddof=1) / math.sqrt(num_subsets)) if num_subsets > 1 else float("nan")
    return mean, error


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row, a ``block`` x ``block`` tile of distances at a
    time (the k + 1 nearest so far are kept per row; the row itself is the nearest, at distance 0)."""
    radii = []
    for start in range(0, x.shape[0], block):
        rows, nearest = x[start:start + block], None
        for col in range(0, x.shape[0], block):
            distances = torch.cdist(rows, x[col:col + block])
            if nearest is not None:
                distances = torch.cat([nearest, distances], dim=1)
            nearest = distances.topk(min(k + 1, distances.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def _within_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Whether each point lies within some centre's radius (the k-NN manifold estimate), a tile at a time."""
    inside = []
    for start in range(0, points.shape[0], block):
        rows = points[start:start + block]
        found = torch.zeros(rows.shape[0], dtype=torch.bool, device=points.device)
        for col in range(0, centres.shape[0], block):
            found |= (torch.cdist(rows, centres[col:col + block]) <= radii[None, col:col + block]).any(dim=1)
            if bool(found.all()):
                break
        inside.append(found)
    return torch.cat(inside)


def precision_recall(real: Array, generated: Array, k: int = 3, device: Device = None,
                     block: int = 4096) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of
    generated samples inside the real manifold (the union of balls to each real sample's k-th
    nearest real neighbour), recall the fraction of real samples inside the generated one.

    Both sets are copied once to ``device`` (default the CPU) in float32 and the distances are
    computed there in ``block`` x ``block`` tiles, so memory is the sets plus a few tiles, whatever
    N (NVIDIA's StyleGAN2-ADA computes the same distances in float16 on the GPU). A point within
    float32 rounding of a ball's surface (about 1e-6 of the radius) may count either way."""
    r, g = _checked(real, "precision/recall"), _checked(generated, "precision/recall")
    if r.shape[1] != g.shape[1]:
        raise MetricsError(f"precision/recall: {r.shape[1]}-d and {g.shape[1]}-d features: different extractors")
    if min(r.shape[0], g.shape[0]) <= k:
        raise MetricsError(f"precision/recall with k={k} needs more than {k} samples in each set, "
                           f"got {r.shape[0]} and {g.shape[0]}")
    r, g = (_take(x, slice(None), device, torch.float32) for x in (r, g))
    precision = _within_any(g, r, _kth_neighbour_radii(r, k, block), block).double().mean()
    recall = _within_any(r, g, _kth_neighbour_radii(g, k, block), block).double().mean()
    return float(precision), float(recall)


def inception_score(probabilities: Array, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) in each of ``splits`` parts; returns
    (mean, standard deviation over the parts). Part i is rows ``i*N//splits`` to
    ``(i+1)*N//splits``, as the original code (openai/improved-gan), torch-fidelity and
    StyleGAN2-ADA split, so N need not be a multiple of ``splits``."""
    p = _as_float64(_checked(probabilities, "inception score"))
    n = p.shape[0]
    if splits < 1 or n < splits:
        raise MetricsError(f"inception score: {n} samples cannot make {splits} splits")
    scores = []
    for i in range(splits):
        part = p[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (torch.log(part.clamp_min(1e-30)) - torch.log(marginal.clamp_min(1e-30)))).sum(dim=1)
        scores.append(math.exp(float(kl.mean())))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- image metrics

def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, shape [B]; ``data_range`` 2.0 for images in [-1, 1]."""
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range ** 2 / mse)).to(torch.float32)


def mask_iou(pred: torch.Tensor, target: torch.Tensor, reduction: str = "none") -> torch.Tensor:
    """Intersection over union of boolean masks [B, ...] per image ([B]) or its mean.

    An image where both masks are empty scores 1 (the prediction is exactly right).
    """
    if pred.dtype != torch.bool or target.dtype != torch.bool:
        raise ValueError(f"mask_iou expects boolean masks, got {pred.dtype} and {target.dtype} "
                         "(threshold them first)")
    if pred.shape != target.shape:
        raise ValueError(f"mask_iou: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    if reduction not in ("none", "mean"):
        raise ValueError(f"mask_iou: reduction must be 'none' or 'mean', got {reduction!r}")
    inter = (pred & target).flatten(1).sum(dim=1).double()
    union = (pred | target).flatten(1).sum(dim=1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).to(torch.float32)
    return iou.mean() if reduction == "mean" else iou
