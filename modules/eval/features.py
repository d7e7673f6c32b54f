"""Inception features of images: the network, which files count, how they are read, references.

FID uses NVIDIA's TorchScript Inception-v3 ``inception-2015-12-05.pt`` (the network of the
original TF FID, as used by StyleGAN2/3, EDM and clean-fid), read from a local file:
https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
Any object called as ``extractor(images, return_features=True) -> [B, D]`` (and, for the
Inception Score, ``extractor(images, no_output_bias=True) -> [B, K]`` class probabilities) on
float images in 0..255 works in its place. Which files of a folder count is decided by
:func:`list_images`.

Image preprocessing follows clean-fid's "clean" mode: RGB, resized to ``image_size`` (299)
per channel in float32 with PIL's antialiased bicubic filter, so scores do not depend on a
framework's aliasing resize. Scores are comparable to clean-fid's, not to legacy TF FID.

A reference (``.npz``) holds ``mu`` and ``sigma`` (float64, the pytorch-fid / clean-fid key
names) and, when made here, the ``features`` themselves (for KID and precision / recall) and
``source_size``, the [height, width] of the images before the resize (absent when they had
several sizes), so that samples are not scored against references of another resolution. An
ADM reference batch (``arr_0``: uint8 NHWC images) is read as images. Under ``accelerate
launch`` every process extracts its share of the files, and the result is the same.
"""
from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from modules import durable
from modules.data.image_io import find_images, open_image
from modules.errors import MetricsError

INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")

FeatureExtractor = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- references

def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, features: Optional[np.ndarray] = None,
               source_size: Optional[tuple[int, int]] = None) -> Path:
    """A reference file: mu and sigma, and when given the features (KID and precision/recall need
    them) and the images' size before the resize. Written atomically; a failed write is one line."""
    path = Path(path)
    if path.suffix != ".npz":
        raise MetricsError(f"statistics file {path}: must end in .npz")
    arrays = {"mu": np.asarray(mu, dtype=np.float64), "sigma": np.asarray(sigma, dtype=np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, dtype=np.float32)
    if source_size is not None:
        arrays["source_size"] = np.asarray(source_size, dtype=np.int64)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_file(path, write)
    durable.write_or_fail(save, f"statistics file {path}", f"no partial {path.name} is left")
    return path


def load_source_size(path: str | Path) -> Optional[tuple[int, int]]:
    """The [height, width] of the images a reference file was made from, or None (not recorded,
    or images of several sizes)."""
    size = _read_npz(Path(path)).get("source_size")
    if size is None:
        return None
    if size.shape != (2,) or size.dtype.kind not in "iu" or (size < 1).any():
        raise MetricsError(f"statistics file {path}: source_size must be [height, width], got {size!r}")
    return int(size[0]), int(size[1])


def size_text(size: Optional[tuple[int, int]]) -> str:
    return "images of several sizes" if size is None else f"{size[1]}x{size[0]} px images"


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise MetricsError(f"statistics file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise MetricsError(f"statistics file {path}: not a readable .npz of arrays ({e})") from None


def load_features(path: str | Path) -> Optional[np.ndarray]:
    """The features a reference file holds (float64 [N, D]), or None (a file of mu and sigma only)."""
    arrays = _read_npz(Path(path))
    if "features" not in arrays:
        return None
    features = arrays["features"].astype(np.float64)
    if features.ndim != 2 or not np.isfinite(features).all():
        raise MetricsError(f"statistics file {path}: features must be finite [N, D], got {features.shape}")
    return features


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    arrays = _read_npz(path)
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
    actual = durable.sha256_file(path)
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
    requested = _requested_count(folder)
    if listed is not None and requested is not None and len(listed) < requested:
        raise MetricsError(f"image folder {folder}: its sampling run made {len(listed)} of the {requested} images "
                           "requested; run the same sample.py command again to complete it")
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


def _requested_count(folder: Path) -> Optional[int]:
    """How many images a sample.py folder's request.json asked for, or None (not a sample folder)."""
    try:
        count = json.loads((folder / "request.json").read_text()).get("count")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) else None


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


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with open_image(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.float32)
    except Exception as e:  # PIL plugins raise many exception types on corrupt data
        raise MetricsError(f"image {path}: cannot be read ({type(e).__name__}: {e})") from None


def load_image(source, image_size: Optional[int]) -> tuple[np.ndarray, tuple[int, int]]:
    """An image file, or a uint8 HWC array (an ADM reference's rows), as float32 RGB [3, S, S] in 0..255,
    converted and resized as clean-fid does (``convert("RGB")``, which drops alpha, then per-channel
    float bicubic), so scores compare with its statistics; and its (height, width) before the resize.
    Decompression bombs are refused as in training (``open_image``)."""
    rgb = source.astype(np.float32) if isinstance(source, np.ndarray) else _read_rgb(source)
    size = (rgb.shape[0], rgb.shape[1])
    if image_size is not None and size != (image_size, image_size):
        rgb = _clean_resize(rgb, image_size)
    return rgb.transpose(2, 0, 1), size


def _clean_resize(rgb: np.ndarray, image_size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]))
                                .resize((image_size, image_size), Image.Resampling.BICUBIC))
                     for c in range(3)], axis=-1).clip(0, 255)


def _batches(sources: Sequence, batch_size: int, image_size: Optional[int], workers: int
             ) -> Iterator[tuple[torch.Tensor, set[tuple[int, int]]]]:
    """Batches of images and the sizes they had before the resize."""
    # Threads decode and resize (PIL releases the GIL); map() keeps the order and re-raises errors.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            images, sizes = zip(*pool.map(lambda p: load_image(p, image_size), chunk))
            shapes = {im.shape for im in images}
            if len(shapes) > 1:
                raise MetricsError(f"images near {chunk[0] if not isinstance(chunk[0], np.ndarray) else start} "
                                   f"differ in size {sorted(shapes)}; set image_size to resize them")
            yield torch.from_numpy(np.stack(images)), set(sizes)


@dataclass
class Features:
    features: np.ndarray                      # [N, D] float64, for FID, KID, precision and recall
    probabilities: Optional[np.ndarray]       # [N, K] class probabilities, for the Inception Score
    sizes: frozenset = frozenset()            # the (height, width) of the images before the resize

    @property
    def source_size(self) -> Optional[tuple[int, int]]:
        """The one size every image had, or None (several sizes)."""
        return next(iter(self.sizes)) if len(self.sizes) == 1 else None


@torch.no_grad()
def extract_local(sources: Sequence, extractor: FeatureExtractor, batch_size: int = 50,
                  device: str | torch.device = "cpu", image_size: Optional[int] = 299, workers: int = 4,
                  probabilities: bool = False) -> Features:
    """Features of ``sources`` (image paths, or uint8 HWC arrays) in their order, on this process."""
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    feats, probs, sizes = [], [], set()
    for batch, batch_sizes in _batches(sources, batch_size, image_size, workers):
        batch = batch.to(device)
        sizes |= batch_sizes
        f = extractor(batch, return_features=True)
        feats.append(f.reshape(f.shape[0], -1).to(torch.float64).cpu())
        if probabilities:
            probs.append(extractor(batch, no_output_bias=True).to(torch.float64).cpu())
    return Features(torch.cat(feats).numpy() if feats else np.zeros((0, 0)),
                    torch.cat(probs).numpy() if probs else None, frozenset(sizes))


def gather(local: Features, indices: Sequence[int], state) -> Optional[Features]:
    """Every process's features (``indices``: their places in the whole set) on the main process, in
    order; None on the others."""
    from accelerate.utils import gather_object
    parts = [p for p in gather_object([(list(indices), local)]) if p[0]]
    if not state.is_main_process:
        return None
    order = np.argsort(np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in parts]))
    features = np.concatenate([f.features for _, f in parts])[order]
    probs = None if parts[0][1].probabilities is None else np.concatenate([f.probabilities for _, f in parts])[order]
    return Features(features, probs, frozenset().union(*(f.sizes for _, f in parts)))


def extract(sources: Sequence, extractor: FeatureExtractor, batch_size: int = 50, device: str | torch.device = "cpu",
            image_size: Optional[int] = 299, workers: int = 4, probabilities: bool = False, state=None) -> Features:
    """Features of ``sources`` in their order. With ``state`` (accelerate's ``PartialState``) of several
    processes, each process takes every ``num_processes``-th source and the main process returns
    them all, in order (the others None)."""
    if state is None or state.num_processes == 1:
        return extract_local(sources, extractor, batch_size, device, image_size, workers, probabilities)
    mine = range(state.process_index, len(sources), state.num_processes)
    local = extract_local([sources[i] for i in mine], extractor, batch_size, device, image_size, workers,
                          probabilities)
    return gather(local, mine, state)


def reference_sources(reference: str | Path) -> Optional[Sequence]:
    """What a reference's features are extracted from: an image folder's files, a saved
    ``datasets`` folder's images, an ADM ``.npz``'s ``arr_0`` rows; None for a statistics file."""
    path = Path(reference)
    if path.suffix == ".npz":
        arrays = _read_npz(path)
        if "mu" in arrays and "sigma" in arrays and "arr_0" not in arrays:
            return None
        if "arr_0" not in arrays:
            raise MetricsError(f"reference {path}: neither statistics (mu, sigma) nor images (arr_0)")
        images = arrays["arr_0"]
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise MetricsError(f"reference {path}: arr_0 must be uint8 images [N, H, W, 3], got {images.dtype} "
                               f"{images.shape}")
        return list(images)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        from modules.config.schema import DataConfig
        from modules.data.sources import open_source
        source = open_source(DataConfig(path=str(path)))
        return [_arrow_image(source.records.image(int(row))) for row in source.rows]
    return list_images(path)


def _arrow_image(source) -> np.ndarray:
    with open_image(source) as img:
        return np.asarray(img.convert("RGB"))
