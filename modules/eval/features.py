"""Inception features of images: the network, which files count, how they are read, references.

FID uses the Inception-v3 of the original TF FID, read from a local file whose content decides how
(:func:`load_inception`): NVIDIA's TorchScript ``inception-2015-12-05.pt`` (as used by StyleGAN2/3,
EDM and clean-fid; it runs code when loaded, so it must be vouched for by its SHA-256)
https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
or pytorch-fid's state dict ``pt_inception-2015-12-05-6726825d.pth``, read without running code
into modules/eval/fid_inception.py. Any object called as ``extractor(images, return_features=True)
-> [B, D]`` (and, for the Inception Score, ``extractor(images, no_output_bias=True) -> [B, K]``
class probabilities) on float images in 0..255 works in their place. Which files of a folder count
is decided by :func:`list_images`.

Image preprocessing follows clean-fid's "clean" mode: RGB, resized to ``image_size`` (299)
per channel in float32 with PIL's antialiased bicubic filter, so scores do not depend on a
framework's aliasing resize. Scores are comparable to clean-fid's, not to legacy TF FID.

A reference (``.npz``) holds ``mu`` and ``sigma`` (float64, the pytorch-fid / clean-fid key
names) and, when made here, the ``features`` themselves (float32, for KID and precision / recall)
and ``source_size``, the [height, width] of the images before the resize (absent when they had
several sizes), so that samples are not scored against references of another resolution. An
ADM reference batch (``arr_0``: uint8 NHWC images) is read as images. A reference file is read
through :class:`NpzReference`: every array's header is checked (numbers only, a bounded shape that
the file can hold) before anything is allocated, and each array is read once, when first needed
(mapped from the file when stored uncompressed); nothing else reads or hashes the file.

Features are float32 and stay on the CPU of the process that made them (:class:`Features`). Under
``accelerate launch`` every process extracts its share of the files and sums the moments FID needs
(count, sum, sum of outer products) batch by batch on its device; the sums are all-reduced
(:func:`share`), and rows go to the main process only when a metric needs every one of them (KID,
precision/recall, the Inception Score, a statistics file: :func:`gather_rows`). The result is the
one process's, to float64 rounding.
"""
from __future__ import annotations

import hashlib
import math
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from modules import durable
from modules.core.metrics import FeatureMoments
from modules.data.image_io import find_images, open_image
from modules.data.metadata import jsonl_rows, listed_images, path_inside
from modules.errors import DataError, MetricsError

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


def size_text(size: Optional[tuple[int, int]]) -> str:
    return "images of several sizes" if size is None else f"{size[1]}x{size[0]} px images"


# Bounds on what a reference file may hold, checked against each array's header before anything is read.
MAX_FEATURE_WIDTH = 16384               # mu's length: Inception's is 2048
MAX_REFERENCE_ROWS = 10 ** 7            # feature vectors or images in one reference (sample.py's MAX_SAMPLES)
MAX_REFERENCE_IMAGE_SIDE = 4096         # an ADM reference's images
MAX_ARRAY_BYTES = 1 << 36               # 64 GiB: no array of a reference is read beyond this
FINITE_CHECK_ROWS = 1 << 16             # rows of features checked at once (512 MiB at D = 2048)
DEFLATE_MAX_RATIO = 1032                # deflate cannot expand a byte into more than 1032


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    data_start: Optional[int]           # where the values start in the file (a stored member), else None


class NpzReference:
    """A reference ``.npz`` read lazily, each array once: its members' headers are checked (type, shape, size
    against the file) before anything is allocated, an array is read only when first asked for and then kept,
    and an uncompressed member (``np.savez``) is mapped from the file rather than copied. Every problem is a
    one-line :class:`MetricsError` naming the file and the array."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MetricsError(f"statistics file {self.path} not found")
        self.file_size = self.path.stat().st_size
        with self._zip() as zf:
            self.members = {info.filename[:-4]: info for info in zf.infolist() if info.filename.endswith(".npy")}
        self._headers: dict[str, _Header] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._checked: dict[str, object] = {}

    def _fail(self, problem: str) -> MetricsError:
        return MetricsError(f"statistics file {self.path}: {problem}")

    def _zip(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise self._fail(f"not a readable .npz of arrays ({e})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.members

    @property
    def names(self) -> list[str]:
        return sorted(self.members)

    # ------------------------------------------------------------------ headers and arrays

    def header(self, name: str) -> _Header:
        """Array ``name``'s shape and type from its header, checked against the member's size and the bounds."""
        if name in self._headers:
            return self._headers[name]
        info = self.members.get(name)
        if info is None:
            raise self._fail(f"no array {name!r} (has {', '.join(self.names) or 'none'})")
        what = f"array {name!r}"
        if info.flag_bits & 0x1:
            raise self._fail(f"{what} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._fail(f"{what} is compressed with zip method {info.compress_type}; expected none or deflate "
                             "(np.savez or np.savez_compressed)")
        try:
            with self._zip() as zf, zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f".npy format version {version[0]}.{version[1]} is not read here")
                offset = f.tell()
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, TypeError) as e:
            raise self._fail(f"{what}: not an .npy array ({e})") from None
        if dtype.hasobject or dtype.kind not in "biuf" or dtype.subdtype is not None:
            raise self._fail(f"{what} holds {dtype} values; only numbers are read (a pickle is never loaded)")
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise self._fail(f"{what}: its header's shape {shape} is not a shape")
        values = math.prod(shape)
        nbytes = values * dtype.itemsize
        if nbytes > MAX_ARRAY_BYTES:
            raise self._fail(f"{what}: its header claims {values} values of {dtype} ({nbytes} bytes), more than "
                             f"the {MAX_ARRAY_BYTES} bytes a reference array may hold")
        ratio = 1 if info.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO
        if offset + nbytes != info.file_size or nbytes > ratio * info.compress_size + 64:
            raise self._fail(f"{what}: its header claims {values} values of {dtype} ({nbytes} bytes) but the file "
                             f"holds {info.compress_size} bytes of it (damaged or crafted)")
        data_start = None
        if info.compress_type == zipfile.ZIP_STORED and values:
            with open(self.path, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
            if len(local) == 30 and local[:4] == b"PK\x03\x04":
                start = (info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                         + int.from_bytes(local[28:30], "little") + offset)
                if start + nbytes <= self.file_size:
                    data_start = start
        header = _Header(tuple(shape), dtype, bool(fortran), data_start)
        self._headers[name] = header
        return header

    def array(self, name: str) -> np.ndarray:
        """Array ``name`` (read-only), read once: mapped from the file when stored, else decompressed."""
        if name in self._arrays:
            return self._arrays[name]
        header = self.header(name)
        if header.data_start is not None:
            array = np.memmap(self.path, dtype=header.dtype, mode="r", offset=header.data_start, shape=header.shape,
                              order="F" if header.fortran else "C")
        else:
            try:
                with self._zip() as zf, zf.open(self.members[name]) as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
                raise self._fail(f"array {name!r} cannot be read ({e})") from None
            if array.shape != header.shape or array.dtype != header.dtype:
                raise self._fail(f"array {name!r} changed while it was read")
            array.flags.writeable = False
        self._arrays[name] = array
        return array

    # ------------------------------------------------------------------ what a reference holds

    @property
    def holds_statistics(self) -> bool:
        """mu and sigma (a statistics file), rather than images (an ADM reference batch, ``arr_0``)."""
        if "arr_0" in self:
            return False
        if "mu" in self and "sigma" in self:
            return True
        raise MetricsError(f"reference {self.path}: neither statistics (mu, sigma) nor images (arr_0)")

    def feature_width(self) -> int:
        """The length of mu, from its header (nothing is read)."""
        return self._checked_headers()[0]

    def _checked_headers(self) -> tuple[int, Optional[int]]:
        """(D, N): the feature width and the number of feature vectors (None without them), from the headers."""
        if "headers" in self._checked:
            return self._checked["headers"]
        missing = [k for k in ("mu", "sigma") if k not in self]
        if missing:
            raise self._fail(f"missing array(s) {', '.join(missing)} (has {', '.join(self.names) or 'none'})")
        mu, sigma = self.header("mu"), self.header("sigma")
        if len(mu.shape) != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise self._fail(f"mu {mu.shape} and sigma {sigma.shape} are not a mean vector and its square "
                             "covariance")
        width = mu.shape[0]
        if width > MAX_FEATURE_WIDTH:
            raise self._fail(f"mu has {width} values; features are at most {MAX_FEATURE_WIDTH}-d")
        rows = None
        if "features" in self:
            features = self.header("features")
            if len(features.shape) != 2 or features.shape[1] != width or features.shape[0] > MAX_REFERENCE_ROWS:
                raise self._fail(f"features must be [N, {width}] with N <= {MAX_REFERENCE_ROWS}, got "
                                 f"{list(features.shape)}")
            rows = features.shape[0]
        self._checked["headers"] = (width, rows)
        return width, rows

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """mu and sigma as float64, checked (finite, sigma a covariance), once."""
        if "stats" in self._checked:
            return self._checked["stats"]
        self._checked_headers()
        mu, sigma = self.array("mu").astype(np.float64), self.array("sigma").astype(np.float64)
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise self._fail("mu or sigma holds NaN or infinite values")
        lowest = np.linalg.eigvalsh((sigma + sigma.T) / 2).min() if len(mu) else 0.0
        if not np.allclose(sigma, sigma.T, rtol=1e-6, atol=1e-9) or lowest < -1e-6 * max(1.0, np.abs(sigma).max()):
            raise self._fail(f"sigma is not a covariance (symmetric, no negative eigenvalue; its lowest is "
                             f"{lowest:.3g})")
        self._checked["stats"] = (mu, sigma)
        return mu, sigma

    def has_features(self) -> bool:
        return self._checked_headers()[1] is not None

    def features(self) -> Optional[np.ndarray]:
        """The feature vectors (float32 [N, D], read-only; mapped from the file when stored), or None (a file of
        mu and sigma only), read once and checked finite a block at a time (no copy of the whole)."""
        if "features" in self._checked:
            return self._checked["features"]
        if not self.has_features():
            return None
        features = self.array("features")
        if features.dtype != np.float32:        # another tool's file: one float32 copy
            features = features.astype(np.float32)
            features.flags.writeable = False
        for start in range(0, features.shape[0], FINITE_CHECK_ROWS):
            if not np.isfinite(features[start:start + FINITE_CHECK_ROWS]).all():
                raise self._fail("features hold NaN or infinite values")
        self._checked["features"] = features
        return features

    def identity(self) -> dict:
        """What the file holds, for the key of a score against it, without reading it again: the SHA-256 of mu
        and sigma (read for any score) and each array's name, size and CRC-32 from the zip directory (the
        features' too, which FID alone never reads)."""
        mu, sigma = (np.ascontiguousarray(self.array(name)) for name in ("mu", "sigma"))
        digest = hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()
        return {"statistics_sha256": digest,
                "arrays": sorted([name, info.file_size, info.CRC] for name, info in self.members.items())}

    def source_size(self) -> Optional[tuple[int, int]]:
        """The [height, width] of the images the reference was made from, or None (not recorded, or several)."""
        if "source_size" not in self:
            return None
        header = self.header("source_size")
        size = self.array("source_size") if header.shape == (2,) else None
        if size is None or size.dtype.kind not in "iu" or (size < 1).any():
            raise self._fail(f"source_size must be [height, width], got {header.shape} {header.dtype}")
        return int(size[0]), int(size[1])

    def images(self) -> Sequence[np.ndarray]:
        """An ADM reference batch's images (uint8 [H, W, 3] each), read lazily when the file stores them."""
        header = self.header("arr_0")
        shape = header.shape
        if (len(shape) != 4 or shape[-1] != 3 or header.dtype != np.uint8 or shape[0] > MAX_REFERENCE_ROWS
                or max(shape[1:3], default=0) > MAX_REFERENCE_IMAGE_SIDE):
            raise MetricsError(f"reference {self.path}: arr_0 must be uint8 images [N, H, W, 3] (N <= "
                               f"{MAX_REFERENCE_ROWS}, sides <= {MAX_REFERENCE_IMAGE_SIDE}), got {header.dtype} "
                               f"{list(shape)}")
        return self.array("arr_0")


def load_source_size(path: str | Path) -> Optional[tuple[int, int]]:
    """The [height, width] of the images a reference file was made from, or None (not recorded,
    or images of several sizes)."""
    return NpzReference(path).source_size()


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    return NpzReference(path).stats()


# ----------------------------------------------------------------------------- Inception and folders

PYTORCH_FID_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"
# torch.save's format before zip archives: pickle protocol 2, then torch's magic number.
LEGACY_TORCH_SAVE = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."


def inception_format(path: Path) -> str:
    """What an Inception file is, from its content: ``"torchscript"`` (a TorchScript archive, such as NVIDIA's
    ``inception-2015-12-05.pt``: a zip holding ``code/``) or ``"state_dict"`` (``torch.save`` output, zip or
    legacy, such as pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``); anything else is one line."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(LEGACY_TORCH_SAVE))
    except OSError as e:
        raise MetricsError(f"Inception weights {path}: cannot be read ({e.strerror or e})") from None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        names = []
    if any("/code/" in name or name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    if any(name.endswith("/data.pkl") for name in names) or head == LEGACY_TORCH_SAVE:
        return "state_dict"
    raise MetricsError(f"Inception weights {path}: neither a TorchScript archive (NVIDIA's inception-2015-12-05.pt) "
                       f"nor a PyTorch state dict (pytorch-fid's {PYTORCH_FID_WEIGHTS})")


def load_inception(path: str | Path, device: str | torch.device = "cpu", sha256: Optional[str] = None,
                   trust_code: bool = False) -> torch.nn.Module:
    """The FID Inception-v3 from a local file, in eval mode on ``device``, chosen by the file's content:

    * NVIDIA's TorchScript ``inception-2015-12-05.pt``. A TorchScript file runs its own code when it is loaded
      and called (it can write any file), so it is loaded only when the user vouches for it: its SHA-256 must
      equal ``sha256`` (the hash published with the file the user downloaded), or ``trust_code`` must be set.
    * pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or torch-fidelity's file of the same keys): a
      plain state dict, read with ``torch.load(weights_only=True)``, which runs no code, into
      :class:`modules.eval.fid_inception.FIDInceptionV3`. A ``sha256`` given is still checked.
    """
    path = Path(path)
    if not path.is_file():
        raise MetricsError(f"Inception weights {path} not found; download inception-2015-12-05.pt "
                           f"(TorchScript, not the .pkl) from {INCEPTION_URL}, or use pytorch-fid's "
                           f"{PYTORCH_FID_WEIGHTS}")
    kind = inception_format(path)
    if sha256 or (kind == "torchscript" and not trust_code):
        actual = durable.sha256_file(path)
        if actual != (sha256 or "").strip().lower():
            given = f"not the {sha256} given by --inception-sha256" if sha256 else "and no --inception-sha256 was given"
            raise MetricsError(f"Inception weights {path}: its SHA-256 is {actual}, {given}. "
                               + ("" if sha256 else "A TorchScript file runs its own code when loaded, so it is "
                                  "loaded only when vouched for: pass the SHA-256 published for the file you "
                                  "downloaded, or --trust-inception-code to run it anyway"))
    if kind == "state_dict":
        return _load_fid_inception(path, device)
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # TorchScript raises RuntimeError/ValueError for damaged archives
        raise MetricsError(f"Inception weights {path}: not a readable TorchScript archive ({type(e).__name__}); "
                           f"expected inception-2015-12-05.pt from {INCEPTION_URL}") from None
    return model.eval()


def _load_fid_inception(path: Path, device: str | torch.device) -> torch.nn.Module:
    """pytorch-fid's weights into our FID Inception; a file of other keys or shapes is one line."""
    from modules.eval.fid_inception import FIDInceptionV3
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the safe unpickler raises UnpicklingError, RuntimeError, ... on foreign content
        raise MetricsError(f"Inception weights {path}: not a plain state dict of tensors ({type(e).__name__}); "
                           f"expected pytorch-fid's {PYTORCH_FID_WEIGHTS}") from None
    net = FIDInceptionV3()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricsError(f"Inception weights {path}: a {type(state).__name__}, not a state dict of tensors; "
                           f"expected pytorch-fid's {PYTORCH_FID_WEIGHTS}")
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("num_batches_tracked"))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        problems = [f"{len(found)} {what} (e.g. {found[0]})" for what, found in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("keys of other shapes", wrong))
                    if found]
        raise MetricsError(f"Inception weights {path}: not the FID Inception's state dict: {', '.join(problems)}; "
                           f"expected pytorch-fid's {PYTORCH_FID_WEIGHTS}")
    net.load_state_dict(state)
    return net.to(device).eval()


def list_images(folder: str | Path) -> list[Path]:
    """The images of ``folder``, in a fixed order.

    * a ``sample.py`` output (``manifest.jsonl``): the files it lists, so ``grid.png`` is left out;
    * an imagefolder data set with ``metadata.jsonl`` / ``metadata.csv``: its ``file_name``
      column, read and checked as training reads it (``modules.data.metadata.listed_images``), so
      paired masks (``mask_file_name``) are left out;
    * otherwise every image file under ``folder`` (``modules.data.image_io.find_images``: the same
      files training reads), recursively (class sub-folders), sorted by path; ``masks/`` folders
      (``MASKS_FOLDER``) and this toolkit's output folders are left out, as in training.

    Every path a manifest or metadata file lists must stay inside ``folder``
    (``modules.data.metadata.path_inside``); one that does not is a one-line error naming it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MetricsError(f"image folder {folder} not found")
    if (folder / "request.json").is_file() and not (folder / "manifest.jsonl").is_file():
        raise MetricsError(f"image folder {folder}: its sampling run did not finish (no manifest.jsonl); "
                           "run the same sample.py command again to complete it")
    files = _listed_files(folder)
    requested = _requested_count(folder)
    if files is not None and requested is not None and len(files) < requested:
        raise MetricsError(f"image folder {folder}: its sampling run made {len(files)} of the {requested} images "
                           "requested; run the same sample.py command again to complete it")
    if files is not None:
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
        request = durable.read_json(folder / "request.json")
    except ValueError:
        return None
    count = request.get("count") if isinstance(request, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else None


def _inside(folder: Path, name: object, where: str) -> Path:
    """``folder / name`` for a relative path inside ``folder``; anything else is a one-line error naming it."""
    if not isinstance(name, str) or not name:
        raise MetricsError(f"{where}: expected a file name, got {name!r}")
    try:
        return path_inside(folder, name, where)
    except DataError as e:
        raise MetricsError(str(e)) from None


def _manifest_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` of each line of a sample manifest, read as metadata files are (a line at a time, each
    at most ``MAX_METADATA_LINE`` bytes, UTF-8); a problem is one line naming the file and the line."""
    for number, row in jsonl_rows(path, MetricsError, "a manifest line describes one image"):
        where = f"{path}, line {number}"
        if not isinstance(row, dict) or "file" not in row:
            raise MetricsError(f"{where}: every line needs a 'file' field")
        yield where, row


def _listed_files(folder: Path) -> Optional[list[Path]]:
    """The files a sample manifest or an imagefolder metadata file lists, or None when there is neither."""
    path = folder / "manifest.jsonl"
    if path.is_file():
        return [_inside(folder, row["file"], where) for where, row in _manifest_rows(path)]
    try:
        return listed_images(folder)        # the metadata table, read and checked as training reads it
    except DataError as e:
        raise MetricsError(str(e)) from None


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
    """A set's features as extracted by one process or several. ``rows`` are this process's share: rows
    ``process_index::num_processes`` of the set (all of them with one process), float32, on the CPU; they stay
    there until a metric needs every row (:meth:`all_rows`, on the main process only). ``moments`` (FID's sums)
    and ``sizes`` are over the whole set, the same on every process."""
    rows: np.ndarray                          # [n, D] float32: this process's feature vectors
    probabilities: Optional[np.ndarray]       # [n, K] float32 class probabilities, for the Inception Score
    moments: FeatureMoments                   # count, sum and sum of outer products over the whole set
    sizes: frozenset = frozenset()            # the (height, width) of the images before the resize
    state: Any = None                         # accelerate's state when several processes share the set

    @property
    def count(self) -> int:
        return self.moments.count

    @property
    def width(self) -> int:
        return self.moments.width

    @property
    def source_size(self) -> Optional[tuple[int, int]]:
        """The one size every image had, or None (several sizes)."""
        return next(iter(self.sizes)) if len(self.sizes) == 1 else None

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """mu and sigma of the whole set (float64), from the moments: no row moves."""
        if not hasattr(self, "_statistics"):
            self._statistics = self.moments.statistics()
        return self._statistics

    def all_rows(self) -> Optional[np.ndarray]:
        """Every feature vector in the set's order on the main process, None on the others (with several
        processes every one must call it)."""
        return self._all(self.rows)

    def all_probabilities(self) -> Optional[np.ndarray]:
        return self._all(self.probabilities)

    def _all(self, local: np.ndarray) -> Optional[np.ndarray]:
        if self.state is None:
            return local
        return gather_rows(local, self.count, self.state, self.moments.device)

    def digest(self) -> str:
        """A 256-bit identity of the set's features in order, the same under any number of processes: each row
        is hashed (SHA-256) with its place in the set and the hashes are summed modulo 2^256 over every process
        (with several processes every one must call it)."""
        first, stride = (self.state.process_index, self.state.num_processes) if self.state else (0, 1)
        total = 0
        for j, row in enumerate(np.ascontiguousarray(self.rows)):
            place = (first + j * stride).to_bytes(8, "little")
            total += int.from_bytes(hashlib.sha256(place + row.tobytes()).digest(), "little")
        if self.state is not None:
            total = sum(_everyones(total, self.state))
        return f"{total % (1 << 256):064x}"


@torch.no_grad()
def extract_local(sources: Sequence, extractor: FeatureExtractor, batch_size: int = 50,
                  device: str | torch.device = "cpu", image_size: Optional[int] = 299, workers: int = 4,
                  probabilities: bool = False) -> Features:
    """Features of ``sources`` (image paths, or uint8 HWC arrays) in their order, on this process; their moments
    are summed on ``device`` batch by batch."""
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    feats, probs, sizes, moments = [], [], set(), None
    for batch, batch_sizes in _batches(sources, batch_size, image_size, workers):
        batch = batch.to(device)
        sizes |= batch_sizes
        f = extractor(batch, return_features=True)
        f = f.reshape(f.shape[0], -1)
        moments = moments or FeatureMoments(f.shape[1], f.device)
        moments.add(f)
        feats.append(f.float().cpu())
        if probabilities:
            probs.append(extractor(batch, no_output_bias=True).float().cpu())
    return Features(torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32),
                    torch.cat(probs).numpy() if probs else None, moments or FeatureMoments(0, device),
                    frozenset(sizes))


def share(local: Features, state) -> Features:
    """One process's ``local`` features (rows ``process_index::num_processes`` of the set) as its share of the
    whole: the moments are summed over every process (count, sum and sum of outer products: an all-reduce of
    D^2 + D + 1 numbers) and the images' sizes united; the rows stay where they are."""
    import torch.distributed as dist
    device = local.moments.device
    width = torch.tensor([local.width], dtype=torch.int64, device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)        # a process with no share learns the width
    moments, rows, probs = local.moments, local.rows, local.probabilities
    if moments.width != int(width):
        moments, rows = FeatureMoments(int(width), device), np.zeros((0, int(width)), np.float32)
    count = torch.tensor([moments.count], dtype=torch.float64, device=device)
    for total in (count, *moments.sums()):
        dist.all_reduce(total)
    moments.count = int(count.item())
    sizes = frozenset().union(*_everyones(local.sizes, state))
    return Features(rows, probs, moments, sizes, state)


GATHER_SLICE_BYTES = 64 << 20           # per process and step of gather_rows


def _everyones(value, state) -> list:
    """A small value from every process, on every process."""
    import torch.distributed as dist
    values = [None] * state.num_processes
    dist.all_gather_object(values, value)
    return values


def gather_rows(local: Optional[np.ndarray], count: int, state, device: str | torch.device) -> Optional[np.ndarray]:
    """Rows that the processes hold (process r: rows r, r + P, ... of ``count``) on the main process in their
    order, None on the others. They are sent a slice at a time (``GATHER_SLICE_BYTES`` per process) to the
    main process only, so no other process receives any and no device holds more than a slice per process."""
    import torch.distributed as dist
    processes, main = state.num_processes, state.is_main_process
    width = max(_everyones(-1 if local is None else local.shape[1], state))
    if width < 0:
        return None
    local = np.zeros((0, width), np.float32) if local is None or local.shape[1] != width else local
    per_process = -(-count // processes)
    out = np.empty((count, width), np.float32) if main else None
    step = max(1, GATHER_SLICE_BYTES // (4 * max(1, width)))
    for start in range(0, per_process, step):
        piece = torch.zeros(min(step, per_process - start), width, dtype=torch.float32, device=device)
        mine = local[start:start + piece.shape[0]]
        piece[:len(mine)] = torch.from_numpy(np.ascontiguousarray(mine, dtype=np.float32)).to(device)
        received = [torch.empty_like(piece) for _ in range(processes)] if main else None
        dist.gather(piece, received, dst=0)
        for rank, part in enumerate(received or ()):
            target = out[rank + start * processes::processes]     # rank r's row j is row r + j P of the set
            n = min(len(target), piece.shape[0])
            target[:n] = part[:n].cpu().numpy()
    return out


def extract(sources: Sequence, extractor: FeatureExtractor, batch_size: int = 50, device: str | torch.device = "cpu",
            image_size: Optional[int] = 299, workers: int = 4, probabilities: bool = False, state=None) -> Features:
    """Features of ``sources`` in their order. With ``state`` (accelerate's ``PartialState``) of several
    processes, each process extracts every ``num_processes``-th source and keeps its rows; the moments and
    sizes are reduced over every process (:func:`share`)."""
    if state is None or state.num_processes == 1:
        return extract_local(sources, extractor, batch_size, device, image_size, workers, probabilities)
    mine = range(state.process_index, len(sources), state.num_processes)
    local = extract_local([sources[i] for i in mine], extractor, batch_size, device, image_size, workers,
                          probabilities)
    return share(local, state)


def reference_sources(reference: str | Path, opened: Optional[NpzReference] = None) -> Optional[Sequence]:
    """What a reference's features are extracted from: an image folder's files, a saved
    ``datasets`` folder's images, an ADM ``.npz``'s ``arr_0`` rows; None for a statistics file.
    ``opened``: the reference's :class:`NpzReference`, when the caller has it (so it is read once)."""
    path = Path(reference)
    if path.suffix == ".npz":
        npz = opened or NpzReference(path)
        return None if npz.holds_statistics else npz.images()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        from modules.config.schema import DataConfig
        from modules.data.sources import open_source
        source = open_source(DataConfig(path=str(path)))
        return [_arrow_image(source.records.image(int(row))) for row in source.rows]
    return list_images(path)


@torch.no_grad()
def feature_width(extractor: FeatureExtractor, image_size: int, device: str | torch.device = "cpu",
                  probabilities: bool = False) -> int:
    """The length of the extractor's feature vectors, from one forward of a blank image (a start-up check
    against a reference's, before anything is generated or extracted); ``probabilities``: its class
    probabilities (the Inception Score's) are tried too."""
    blank = torch.zeros(1, 3, image_size, image_size, device=device)
    try:
        features = extractor(blank, return_features=True)
        if probabilities:
            extractor(blank, no_output_bias=True)
    except Exception as e:  # a TorchScript extractor raises many types on inputs it cannot take
        what = "class probabilities" if probabilities else "features"
        raise MetricsError(f"the feature extractor fails on a {image_size} px image ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); it must give {what} as "
                           "NVIDIA's Inception does") from None
    return int(features.reshape(features.shape[0], -1).shape[1])


def check_feature_width(width: int, reference_width: int, reference: str | Path, extractor: str | Path) -> None:
    """One line when a reference's features are not the extractor's."""
    if width != reference_width:
        raise MetricsError(f"reference {reference} has {reference_width}-d features but the extractor {extractor} "
                           f"gives {width}-d: statistics from a different network; make the reference with "
                           "`evaluate.py stats` and the same extractor")


def _arrow_image(source) -> np.ndarray:
    with open_image(source) as img:
        return np.asarray(img.convert("RGB"))
