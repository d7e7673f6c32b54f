"""Evaluation metrics over features and images: FID, KID, precision and recall, Inception Score,
PSNR and mask IoU. Where the features come from is modules/features.py.

Everything is computed in float64; every random choice (KID's subsets) is seeded.
"""
from __future__ import annotations

import math
from typing import Union

import numpy as np
import torch

from modules.errors import MetricsError

Array = Union[np.ndarray, torch.Tensor]


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


def feature_statistics(features: Array) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, like np.cov) of ``features`` [N, D], float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features,
                   dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise MetricsError(f"feature statistics need at least 2 feature vectors [N, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


# ----------------------------------------------------------------------------- KID, precision and recall, IS

def _rows(x: Array) -> torch.Tensor:
    t = _as_float64(x)
    if t.ndim != 2 or t.shape[0] < 2:
        raise MetricsError(f"expected at least 2 feature vectors [N, D], got shape {tuple(t.shape)}")
    return t


def kernel_inception_distance(features_a: Array, features_b: Array, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3,
    averaged over random subsets of equal size (clean-fid's defaults); returns (mean, standard
    error of the mean over the subsets)."""
    a, b = _rows(features_a), _rows(features_b)
    if a.shape[1] != b.shape[1]:
        raise MetricsError(f"KID: {a.shape[1]}-d and {b.shape[1]}-d features: different extractors")
    d, m = a.shape[1], min(a.shape[0], b.shape[0], max_subset_size)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num_subsets):
        x = a[torch.randperm(a.shape[0], generator=generator)[:m]]
        y = b[torch.randperm(b.shape[0], generator=generator)[:m]]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        values.append(float(within - 2 * kxy.sum() / (m * m)))
    mean = float(np.mean(values))
    error = float(np.std(values, ddof=1) / math.sqrt(num_subsets)) if num_subsets > 1 else float("nan")
    return mean, error


def _kth_neighbour_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    radii = []
    for start in range(0, x.shape[0], block):
        distances = torch.cdist(x[start:start + block], x)
        radii.append(distances.kthvalue(k + 1, dim=1).values)   # the row itself is at distance 0
    return torch.cat(radii)


def _within_any(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    """Whether each point lies within some centre's radius (the k-NN manifold estimate)."""
    inside = []
    for start in range(0, points.shape[0], block):
        distances = torch.cdist(points[start:start + block], centres)
        inside.append((distances <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: Array, generated: Array, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision is the fraction of
    generated samples inside the real manifold (the union of balls to each real sample's k-th
    nearest real neighbour), recall the fraction of real samples inside the generated one."""
    r, g = _rows(real), _rows(generated)
    if min(r.shape[0], g.shape[0]) <= k:
        raise MetricsError(f"precision/recall with k={k} needs more than {k} samples in each set, "
                           f"got {r.shape[0]} and {g.shape[0]}")
    precision = _within_any(g, r, _kth_neighbour_radii(r, k, block), block).double().mean()
    recall = _within_any(r, g, _kth_neighbour_radii(g, k, block), block).double().mean()
    return float(precision), float(recall)


def inception_score(probabilities: Array, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016): exp E_x KL(p(y|x) || p(y)) in each of ``splits`` equal splits;
    returns (mean, standard deviation over the splits), as the original implementation reports."""
    p = _rows(probabilities)
    if splits < 1 or p.shape[0] < splits:
        raise MetricsError(f"inception score: {p.shape[0]} samples cannot make {splits} splits")
    scores = []
    for part in p.chunk(splits):
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
