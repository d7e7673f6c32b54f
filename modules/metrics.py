"""Evaluation metrics: FID (Inception features of image folders), PSNR and mask IoU.

FID uses NVIDIA's TorchScript Inception-v3 ``inception-2015-12-05.pt`` (the network of the
original TF FID, as used by StyleGAN2/3, EDM and clean-fid), read from a local file:
https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
Any object called as ``extractor(images, return_features=True) -> [B, D]`` on float images in
0..255 works in its place. Which files of a folder count is decided by :func:`list_images`.

Image preprocessing follows clean-fid's "clean" mode: RGB, resized to ``image_size`` (299)
per channel in float32 with PIL's antialiased bicubic filter, so scores do not depend on a
framework's aliasing resize. Scores are comparable to clean-fid's, not to legacy TF FID.
Statistics are float64 and saved as ``.npz`` with arrays ``mu`` and ``sigma`` (the
pytorch-fid / clean-fid key names).
"""
from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
import torch
from PIL import Image

from modules.errors import MetricsError
from modules.export import file_sha256
from modules.image_io import find_images, open_image

INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")

Array = Union[np.ndarray, torch.Tensor]
FeatureExtractor = Callable[..., torch.Tensor]


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


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> Path:
    path = Path(path)
    if path.suffix != ".npz":
        raise MetricsError(f"statistics file {path}: must end in .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"statistics file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise MetricsError(f"statistics file {path}: not a readable .npz of arrays ({e})") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise MetricsError(f"statistics file {path}: missing array(s) {', '.join(missing)} "
                           f"(has {', '.join(arrays) or 'none'})")
    mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricsError(f"statistics file {path}: mu {mu.shape} and sigma {sigma.shape} are not a "
                           "mean vector and its square covariance")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricsError(f"statistics file {path}: mu or sigma holds NaN or infinite values")
    lowest = np.linalg.eigvalsh((sigma + sigma.T) / 2).min() if len(mu) else 0.0
    if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-9) or lowest < -1e-6 * max(1.0, np.abs(sigma).max()):
        raise MetricsError(f"statistics file {path}: sigma is not a covariance (symmetric, no negative "
                           f"eigenvalue; its lowest is {lowest:.3g})")
    return mu, sigma


# ----------------------------------------------------------------------------- Inception and folders

def load_inception(path: str | Path, device: str | torch.device = "cpu", sha256: Optional[str] = None,
                   trust_code: bool = False) -> torch.jit.ScriptModule:
    """NVIDIA's TorchScript Inception-v3 from a local file, in eval mode on ``device``.

    A TorchScript file runs its own code when it is loaded and called (it can write any file),
    so only a file the user vouches for is loaded: its SHA-256 must equal ``sha256`` (the hash
    published with the file the user downloaded), or ``trust_code`` must be set.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"Inception weights {path} not found; download inception-2015-12-05.pt "
                           f"(TorchScript, not the .pkl) from {INCEPTION_URL}")
    actual = file_sha256(path)
    if not trust_code and actual != (sha256 or "").strip().lower():
        given = f"not the {sha256} given by --inception-sha256" if sha256 else "and no --inception-sha256 was given"
        raise MetricsError(f"Inception weights {path}: a TorchScript file runs its own code when loaded, so it is "
                           f"loaded only when vouched for. Its SHA-256 is {actual}, {given}. Pass the SHA-256 "
                           "published for the file you downloaded, or --trust-inception-code to run it anyway")
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # TorchScript raises RuntimeError/ValueError for non-archives
        raise MetricsError(f"Inception weights {path}: not a TorchScript archive ({type(e).__name__}); "
                           f"expected inception-2015-12-05.pt from {INCEPTION_URL}") from None
    return model.eval()


def list_images(folder: str | Path) -> list[Path]:
    """The images of ``folder``, in a fixed order.

    * a ``sample.py`` output (``manifest.jsonl``): the files it lists, so ``grid.png`` is left out;
    * an imagefolder data set with ``metadata.jsonl`` / ``metadata.csv``: its ``file_name``
      column, so paired masks (``mask_file_name``) are left out;
    * otherwise every image file under ``folder`` (``modules.image_io.find_images``: the same
      files training reads), recursively (class sub-folders), sorted by path.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricsError(f"image folder {folder} not found")
    if (folder / "request.json").is_file() and not (folder / "manifest.jsonl").is_file():
        raise MetricsError(f"image folder {folder}: its sampling run did not finish (no manifest.jsonl); "
                           "run the same sample.py command again to complete it")
    listed = _listed_files(folder)
    if listed is not None:
        files = [folder / name for name in listed]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise MetricsError(f"image folder {folder}: {len(missing)} listed file(s) missing, e.g. {missing[0]}")
    else:
        files = find_images(folder)
    if not files:
        raise MetricsError(f"image folder {folder} has no .png, .jpg, .webp or other image files")
    return files


def _listed_files(folder: Path) -> Optional[list[str]]:
    """File names from a sample manifest or imagefolder metadata, or None when there is neither."""
    for name, column in (("manifest.jsonl", "file"), ("metadata.jsonl", "file_name")):
        path = folder / name
        if path.is_file():
            try:
                rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            except json.JSONDecodeError as e:
                raise MetricsError(f"{path}: invalid JSON line ({e})") from None
            if not all(isinstance(r, dict) and column in r for r in rows):
                raise MetricsError(f"{path}: every line needs a '{column}' field")
            return [str(r[column]) for r in rows]
    path = folder / "metadata.csv"
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if "file_name" not in (reader.fieldnames or []):
                raise MetricsError(f"{path}: no 'file_name' column")
            return [row["file_name"] for row in reader]
    return None


def load_image(path: Path, image_size: Optional[int]) -> np.ndarray:
    """RGB float32 [3, S, S] in 0..255, converted and resized as clean-fid does (``convert("RGB")``,
    which drops alpha, then per-channel float bicubic), so scores compare with its statistics.
    Decompression bombs are refused as in training (``open_image``)."""
    try:
        with open_image(path) as img:
            rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    except Exception as e:  # PIL plugins raise many exception types on corrupt data
        raise MetricsError(f"image {path}: cannot be read ({type(e).__name__}: {e})") from None
    if image_size is not None and rgb.shape[:2] != (image_size, image_size):
        rgb = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]))
                                   .resize((image_size, image_size), Image.Resampling.BICUBIC))
                        for c in range(3)], axis=-1).clip(0, 255)
    return rgb.transpose(2, 0, 1)


def _batches(files: list[Path], batch_size: int, image_size: Optional[int],
             workers: int) -> Iterator[torch.Tensor]:
    # Threads decode and resize (PIL releases the GIL); map() keeps file order and re-raises errors.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            images = list(pool.map(lambda p: load_image(p, image_size), chunk))
            shapes = {im.shape for im in images}
            if len(shapes) > 1:
                raise MetricsError(f"images near {chunk[0]} differ in size {sorted(shapes)}; "
                                   "set image_size to resize them")
            yield torch.from_numpy(np.stack(images))


@torch.no_grad()
def folder_features(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 50,
                    device: str | torch.device = "cpu", image_size: Optional[int] = 299,
                    workers: int = 4) -> np.ndarray:
    """Features [N, D] (float64) of every image under ``folder``, in sorted path order."""
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    files = list_images(folder)
    out = []
    for batch in _batches(files, batch_size, image_size, workers):
        feats = extractor(batch.to(device), return_features=True)
        out.append(feats.reshape(feats.shape[0], -1).to(torch.float64).cpu())
    return torch.cat(out).numpy()


def folder_statistics(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 50,
                      device: str | torch.device = "cpu", image_size: Optional[int] = 299,
                      workers: int = 4) -> tuple[np.ndarray, np.ndarray]:
    return feature_statistics(folder_features(folder, extractor, batch_size, device, image_size, workers))


def _checked_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray],
                      name_a: str, name_b: str) -> float:
    if stats_a[0].shape != stats_b[0].shape:
        raise MetricsError(f"{name_a} has {stats_a[0].shape[0]}-d features but {name_b} has "
                           f"{stats_b[0].shape[0]}-d: they were computed with different extractors")
    return frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1])


def fid_from_folders(folder_a: str | Path, folder_b: str | Path, extractor: FeatureExtractor,
                     batch_size: int = 50, device: str | torch.device = "cpu",
                     image_size: Optional[int] = 299, workers: int = 4) -> float:
    stats_a = folder_statistics(folder_a, extractor, batch_size, device, image_size, workers)
    stats_b = folder_statistics(folder_b, extractor, batch_size, device, image_size, workers)
    return _checked_distance(stats_a, stats_b, str(folder_a), str(folder_b))


def fid_folder_vs_stats(folder: str | Path, stats_path: str | Path, extractor: FeatureExtractor,
                        batch_size: int = 50, device: str | torch.device = "cpu",
                        image_size: Optional[int] = 299, workers: int = 4) -> float:
    reference = load_stats(stats_path)
    stats = folder_statistics(folder, extractor, batch_size, device, image_size, workers)
    return _checked_distance(stats, reference, str(folder), str(stats_path))


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
