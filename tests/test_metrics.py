"""Evaluation metrics: Frechet distance vs scipy, folder FID through the Inception code path
(with a small TorchScript stand-in), PSNR and mask IoU closed forms, evaluate.py CLI."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
from PIL import Image

import evaluate
from modules.core.metrics import (feature_statistics, frechet_distance, inception_score, kernel_inception_distance,
                                  mask_iou, precision_recall, psnr)
from modules.errors import MetricsError
from modules.eval.features import (INCEPTION_URL, FeatureExtractor, extract, list_images, load_image, load_inception,
                                   load_source_size, load_stats, save_stats)

REPO = Path(__file__).resolve().parent.parent
SIZE = 32   # images are resized to this instead of 299 to keep the stand-in fast


# ----------------------------------------------------------------------------- folder FID (test helpers)
# Folder-level FID, once in modules/eval/features.py: the tests' reference path through extract().

def folder_features(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 50,
                    device: str | torch.device = "cpu", image_size: Optional[int] = 299,
                    workers: int = 4) -> np.ndarray:
    """Features [N, D] (float32) of every image of ``folder`` (:func:`list_images`), in its order."""
    return extract(list_images(folder), extractor, batch_size, device, image_size, workers).all_rows()


def _checked_distance(stats_a: tuple[np.ndarray, np.ndarray], stats_b: tuple[np.ndarray, np.ndarray],
                      name_a: str, name_b: str) -> float:
    if stats_a[0].shape != stats_b[0].shape:
        raise MetricsError(f"{name_a} has {stats_a[0].shape[0]}-d features but {name_b} has "
                           f"{stats_b[0].shape[0]}-d: they were computed with different extractors")
    return frechet_distance(stats_a[0], stats_a[1], stats_b[0], stats_b[1])


def fid_from_folders(folder_a: str | Path, folder_b: str | Path, extractor: FeatureExtractor,
                     batch_size: int = 50, device: str | torch.device = "cpu",
                     image_size: Optional[int] = 299, workers: int = 4) -> float:
    stats_a = feature_statistics(folder_features(folder_a, extractor, batch_size, device, image_size, workers))
    stats_b = feature_statistics(folder_features(folder_b, extractor, batch_size, device, image_size, workers))
    return _checked_distance(stats_a, stats_b, str(folder_a), str(folder_b))


def fid_folder_vs_stats(folder: str | Path, stats_path: str | Path, extractor: FeatureExtractor,
                        batch_size: int = 50, device: str | torch.device = "cpu",
                        image_size: Optional[int] = 299, workers: int = 4) -> float:
    reference = load_stats(stats_path)
    stats = feature_statistics(folder_features(folder, extractor, batch_size, device, image_size, workers))
    return _checked_distance(stats, reference, str(folder), str(stats_path))


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    """The reference formula (pytorch-fid): sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class StandInExtractor(nn.Module):
    """A fixed random conv net with Inception's call convention: 0..255 images -> [B, 64] features,
    or (``return_features=False``) probabilities over 10 classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 5, stride=2)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2)
        self.classes = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        h = torch.tanh(self.conv1(x / 127.5 - 1))
        h = torch.tanh(self.conv2(h))
        feats = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return feats if return_features else torch.softmax(self.classes(feats) * 20, dim=1)


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "standin.pt"
    torch.jit.script(StandInExtractor().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def pin(extractor_file) -> list[str]:
    """The command-line words that vouch for the stand-in extractor (its SHA-256)."""
    return ["--inception-sha256", hashlib.sha256(extractor_file.read_bytes()).hexdigest()]


def load_pinned(path: Path):
    return load_inception(path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def write_images(folder: Path, n: int, seed: int, brightness: float = 0.0) -> Path:
    """Smooth random RGB images (upsampled noise) of varying sizes and formats."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)) * (1 - brightness) + 255 * brightness
        size = 24 + 8 * (i % 3)
        img = Image.fromarray(coarse.astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
        img.save(folder / (f"{i:03d}.png" if i % 4 else f"{i:03d}.jpg"), quality=95)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return {"a": write_images(root / "a", 96, seed=1),
            "b": write_images(root / "b", 96, seed=2, brightness=0.3),
            "empty": _mkdir(root / "empty")}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


# ----------------------------------------------------------------------------- Frechet distance

def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 32))
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.5 + 0.3
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-6)
    assert frechet_distance(torch.from_numpy(mu1), torch.from_numpy(s1), mu2, s2) == pytest.approx(got, rel=1e-12)
    assert mu1.dtype == s1.dtype == np.float64
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False))


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(MetricsError, match="shapes"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_stats_round_trip_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    mu, sigma = feature_statistics(rng.normal(size=(20, 5)))
    path = save_stats(tmp_path / "s.npz", mu, sigma)
    mu2, sigma2 = load_stats(path)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)

    np.savez(tmp_path / "wrong.npz", mean=mu)
    with pytest.raises(MetricsError, match="missing array.*mu"):
        load_stats(tmp_path / "wrong.npz")
    np.savez(tmp_path / "pickled.npz", mu=np.array([{"x": 1}], dtype=object), sigma=sigma)
    with pytest.raises(MetricsError, match="pickled.npz"):
        load_stats(tmp_path / "pickled.npz")
    with pytest.raises(MetricsError, match="absent.npz"):
        load_stats(tmp_path / "absent.npz")


# ----------------------------------------------------------------------------- folders

def test_load_image_converts_and_resizes(tmp_path):
    Image.new("L", (40, 20), color=100).save(tmp_path / "gray.png")
    Image.new("RGBA", (10, 10), color=(10, 20, 30, 0)).save(tmp_path / "rgba.png")
    gray = load_image(tmp_path / "gray.png", 16)[0]
    rgba = load_image(tmp_path / "rgba.png", 16)[0]
    assert gray.shape == rgba.shape == (3, 16, 16)
    np.testing.assert_allclose(gray, 100, atol=1e-3)        # resizing keeps a flat image flat
    np.testing.assert_allclose(rgba[:, 5, 5], [10, 20, 30], atol=1e-3)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(MetricsError, match="bad.png"):
        load_image(tmp_path / "bad.png", 16)


def test_list_images_follows_manifests_and_metadata(shapes_dir, tmp_path):
    # imagefolder data set with paired masks: only metadata.jsonl's file_name images count
    files = list_images(shapes_dir)
    assert len(files) == 24 and not any("masks" in f.parts for f in files)
    # sample.py output: the manifest's files, not grid.png
    out = write_images(tmp_path / "samples", 3, seed=3)
    names = sorted(p.name for p in out.iterdir())
    Image.new("RGB", (8, 8)).save(out / "grid.png")
    (out / "manifest.jsonl").write_text("".join(json.dumps({"file": n, "seed": i}) + "\n"
                                                for i, n in enumerate(names)))
    assert [f.name for f in list_images(out)] == names
    (out / "manifest.jsonl").write_text(json.dumps({"file": "gone.png"}) + "\n")
    with pytest.raises(MetricsError, match="gone.png"):
        list_images(out)
    # a plain folder: every image, recursively, sorted
    plain = write_images(tmp_path / "plain", 2, seed=4)
    write_images(plain / "sub", 2, seed=5)
    assert [f.relative_to(plain).as_posix() for f in list_images(plain)] == [
        "000.jpg", "001.png", "sub/000.jpg", "sub/001.png"]


def test_folder_fid_with_itself_is_zero_and_differs_across_folders(folders, extractor_file, tmp_path):
    extractor = load_pinned(extractor_file)
    feats = folder_features(folders["a"], extractor, batch_size=20, image_size=SIZE)
    assert feats.shape == (96, 64) and feats.dtype == np.float32      # never a float64 copy of the features
    # Batching does not change features: compare against one image at a time, in sorted order.
    first = sorted(folders["a"].iterdir())[0]
    single = extractor(torch.from_numpy(load_image(first, SIZE)[0])[None], return_features=True)
    np.testing.assert_allclose(feats[0], single[0].detach().double().numpy(), rtol=1e-5, atol=1e-6)

    assert abs(fid_from_folders(folders["a"], folders["a"], extractor, 32, image_size=SIZE)) < 1e-6
    fid_ab = fid_from_folders(folders["a"], folders["b"], extractor, 32, image_size=SIZE)
    mu_a, s_a = feature_statistics(feats)
    mu_b, s_b = feature_statistics(folder_features(folders["b"], extractor, 32, image_size=SIZE))
    assert fid_ab > 1e-3
    assert fid_ab == pytest.approx(scipy_frechet(mu_a, s_a, mu_b, s_b), rel=1e-6)

    save_stats(tmp_path / "b.npz", mu_b, s_b)
    assert fid_folder_vs_stats(folders["a"], tmp_path / "b.npz", extractor, 32,
                               image_size=SIZE) == pytest.approx(fid_ab, rel=1e-9)
    save_stats(tmp_path / "small.npz", mu_b[:8], s_b[:8, :8])
    with pytest.raises(MetricsError, match="64-d features but .*small.npz has 8-d"):
        fid_folder_vs_stats(folders["a"], tmp_path / "small.npz", extractor, 32, image_size=SIZE)


def test_folder_and_weights_errors(folders, tmp_path):
    with pytest.raises(MetricsError, match="has no .png"):
        folder_features(folders["empty"], StandInExtractor(), image_size=SIZE)
    with pytest.raises(MetricsError, match="nowhere"):
        folder_features(tmp_path / "nowhere", StandInExtractor(), image_size=SIZE)
    with pytest.raises(MetricsError) as err:
        load_inception(tmp_path / "inception-2015-12-05.pt")
    assert "inception-2015-12-05.pt" in str(err.value) and INCEPTION_URL in str(err.value)
    (tmp_path / "not_torchscript.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(MetricsError, match="neither a TorchScript archive .* nor a PyTorch state dict"):
        load_inception(tmp_path / "not_torchscript.pt", trust_code=True)


# ----------------------------------------------------------------------------- PSNR, IoU

def test_psnr_closed_form():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    sigma = torch.tensor([0.01, 0.1, 0.5]).view(3, 1, 1, 1)
    signs = torch.randint(0, 2, x.shape, generator=g) * 2 - 1
    y = x + sigma * signs                       # noise of variance exactly sigma^2 per image
    expected = 10 * torch.log10(4.0 / sigma.flatten() ** 2)
    torch.testing.assert_close(psnr(y, x), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(psnr((y + 1) / 2, (x + 1) / 2, data_range=1.0), expected, rtol=0, atol=1e-4)


def test_mask_iou_known_values():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    target = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    expected = torch.tensor([1 / 3, 1.0, 0.0, 0.5])
    torch.testing.assert_close(mask_iou(pred.view(4, 1, 2, 2), target.view(4, 1, 2, 2)), expected)
    assert mask_iou(pred, target, reduction="mean").item() == pytest.approx(expected.mean().item())
    with pytest.raises(ValueError, match="boolean"):
        mask_iou(pred.float(), target)


# ----------------------------------------------------------------------------- evaluate.py

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_cli_errors_are_one_line_messages(folders, tmp_path, extractor_file, pin):
    missing_weights = run_cli("fid", "--inception", str(tmp_path / "inception-2015-12-05.pt"),
                              str(folders["a"]), str(folders["b"]))
    assert missing_weights.returncode == 2
    assert missing_weights.stderr.startswith("error: ") and "Traceback" not in missing_weights.stderr
    assert "inception-2015-12-05.pt" in missing_weights.stderr and INCEPTION_URL in missing_weights.stderr

    empty = run_cli("fid", "--inception", str(extractor_file), *pin, "--device", "cpu", "--image-size", str(SIZE),
                    str(folders["a"]), str(folders["empty"]))
    assert empty.returncode == 2 and "Traceback" not in empty.stderr
    assert "error: " in empty.stderr and str(folders["empty"]) in empty.stderr

    help_text = run_cli("--help")
    assert help_text.returncode == 0 and "fid" in help_text.stdout and "stats" in help_text.stdout


def test_cli_in_process_errors(folders, tmp_path, capsys, extractor_file, pin):
    assert evaluate.main(["fid", "--inception", str(extractor_file), *pin, str(tmp_path / "nope"),
                          str(folders["a"])]) == 2
    assert "nope" in capsys.readouterr().err
    assert evaluate.main(["fid", "--inception", str(extractor_file), *pin, str(folders["a"]),
                          str(tmp_path / "missing.npz")]) == 2
    assert "missing.npz" in capsys.readouterr().err
    assert evaluate.main(["stats", "--inception", str(extractor_file), *pin, str(folders["a"]),
                          "--out", str(tmp_path / "stats.txt")]) == 2
    assert "must end in .npz" in capsys.readouterr().err


def test_cli_success_matches_the_library(folders, tmp_path, extractor_file, pin, capsys):
    stats_a = tmp_path / "a.npz"
    done = run_cli("fid", "--inception", str(extractor_file), *pin, "--device", "cpu", "--batch-size", "25",
                   "--image-size", str(SIZE), "--save-stats", str(stats_a), str(folders["a"]), str(folders["b"]))
    assert done.returncode == 0, done.stderr
    extractor = load_pinned(extractor_file)
    expected = fid_from_folders(folders["a"], folders["b"], extractor, 25, image_size=SIZE)
    assert float(done.stdout.strip()) == pytest.approx(expected, rel=1e-5)

    stats_b = tmp_path / "b.npz"
    assert evaluate.main(["stats", "--inception", str(extractor_file), *pin, "--device", "cpu", "--image-size",
                          str(SIZE), str(folders["b"]), "--out", str(stats_b)]) == 0
    assert evaluate.main(["fid", "--inception", str(extractor_file), *pin, "--device", "cpu", "--image-size",
                          str(SIZE), str(folders["a"]), str(stats_b)]) == 0
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)
    mu, sigma = load_stats(stats_a)
    np.testing.assert_allclose(frechet_distance(mu, sigma, *load_stats(stats_b)), expected, rtol=1e-9)


def test_every_reader_accepts_the_same_image_files(tmp_path):
    """One definition of "an image file" (modules/image_io.py): FID folders take .webp and .gif
    like the training data does; before, FID silently ignored them."""
    from modules.config.schema import DataConfig
    from modules.data.dataset import build_dataset
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, ext in enumerate(["png", "webp", "gif", "bmp", "tif"]):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.{ext}")
    (folder / "notes.txt").write_text("not an image")
    fid_files = [f.name for f in list_images(folder)]
    assert fid_files == ["0.png", "1.webp", "2.gif", "3.bmp", "4.tif"]
    assert len(build_dataset(DataConfig(path=str(folder), image_size=8))) == len(fid_files)


# ----------------------------------------------------------------------------- KID, precision / recall, IS

def mmd2_unbiased_loops(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out term by term (Gretton et al. 2012)."""
    d, m, n = x.shape[1], len(x), len(y)
    k = lambda a, b: (a @ b / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return float(xx + yy - 2 * xy)


def test_kid_is_the_unbiased_mmd_and_near_zero_for_one_gaussian():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 0.5
    kid, _ = kernel_inception_distance(a, b, num_subsets=1, max_subset_size=30)   # one subset: all rows
    assert kid == pytest.approx(mmd2_unbiased_loops(a, b), rel=1e-9)
    same = kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), num_subsets=50,
                                     max_subset_size=100)
    other = kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) + 0.3, num_subsets=50,
                                      max_subset_size=100)
    assert abs(same[0]) < 4 * same[1] and other[0] > 10 * other[1] > 0


def brute_force_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]                 # index 0 is the point itself

    def inside(points, centres, r):
        d = np.sqrt(((points[:, None] - centres[None]) ** 2).sum(-1))
        return (d <= r[None]).any(axis=1).mean()
    return float(inside(fake, real, radii(real))), float(inside(real, fake, radii(fake)))


def test_precision_recall_match_a_brute_force_computation():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(120, 6))
    fake = np.concatenate([rng.normal(size=(60, 6)) * 0.5, rng.normal(size=(40, 6)) + 4])   # narrow, plus junk
    got = precision_recall(real, fake, k=3, block=17)
    assert got == pytest.approx(brute_force_precision_recall(real, fake, 3), abs=1e-12)
    assert 0.4 < got[0] < 0.8 and got[1] < 0.9             # junk lowers precision, narrowness recall
    assert precision_recall(real, real, k=3) == (1.0, 1.0)


def test_inception_score_closed_forms():
    uniform = np.full((100, 10), 0.1)
    assert inception_score(uniform, splits=5)[0] == pytest.approx(1.0)       # no information: 1
    one_hot = np.eye(10)[np.arange(100) % 10]
    assert inception_score(one_hot, splits=5) == pytest.approx((10.0, 0.0))   # sure and balanced: K


def test_evaluate_metrics_command_reports_every_metric(folders, extractor_file, pin, tmp_path, capsys):
    reference = tmp_path / "ref.npz"
    assert evaluate.main(["stats", "--inception", str(extractor_file), *pin, "--image-size", str(SIZE),
                          str(folders["b"]), "--out", str(reference)]) == 0
    assert evaluate.main(["metrics", "--inception", str(extractor_file), *pin, "--image-size", str(SIZE),
                          "--kid", "--pr", "--is", str(folders["a"]), str(reference)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(folders["a"].iterdir())[:10]:
        (few / p.name).write_bytes(p.read_bytes())
    assert evaluate.main(["fid", "--inception", str(extractor_file), *pin, "--image-size", str(SIZE),
                          str(few), str(reference)]) == 2
    assert "10 samples for 64-d features" in capsys.readouterr().err
    extractor = load_pinned(extractor_file)
    a = folder_features(folders["a"], extractor, image_size=SIZE)
    b = folder_features(folders["b"], extractor, image_size=SIZE)
    assert result["fid"] == pytest.approx(frechet_distance(*feature_statistics(a), *feature_statistics(b)), rel=1e-6)
    assert result["kid"] == pytest.approx(kernel_inception_distance(a, b)[0], rel=1e-4)
    assert (result["precision"], result["recall"]) == pytest.approx(precision_recall(b, a), abs=1e-9)
    assert result["num_samples"] == 96 and result["inception_score"] >= 1.0


def test_scores_reach_the_wandb_run_of_the_training_run_at_its_export_step(folders, extractor_file, pin, shapes_dir,
                                                                             tmp_path, capsys, caplog):
    import train_vae
    from modules import durable
    from support import wandb_offline_runs
    run = tmp_path / "vae_run"
    train_vae.main(["--config", "tiny", "--data", str(shapes_dir), "--output-dir", str(run), "--report-to", "wandb",
                    "--max-steps", "2", "train.checkpoint_every=2", "scale_samples=8"])
    (trained,) = wandb_offline_runs(run)
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    reference = tmp_path / "ref.npz"
    assert evaluate.main(["stats", *common, str(folders["b"]), "--out", str(reference)]) == 0
    capsys.readouterr()
    metrics = ["metrics", *common, "--kid", str(folders["a"]), str(reference), "--log-to", str(run / "vae")]
    assert evaluate.main(metrics) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    *_, evaluated = wandb_offline_runs(run)
    assert evaluated["id"] == trained["id"] and evaluated["project"] == trained["project"] == "ldm-vae"
    (row,) = [r for r in evaluated["history"] if "eval/fid" in r]
    assert row["eval/export_step"] == 2 and row["eval/fid"] == pytest.approx(printed["fid"])
    assert row["eval/kid"] == pytest.approx(printed["kid"]) and row["eval/num_samples"] == 96
    # While a training process holds the run (its lock), its W&B run is left alone: a warning, the scores printed.
    lock = durable.Lock(run / ".lock")
    assert lock.acquire() is None
    try:
        assert evaluate.main(metrics) == 0
    finally:
        lock.release()
    assert "run the command again with --log-to once training stops" in caplog.text
    assert len(wandb_offline_runs(run)) == 2
    # A folder that is not a run reporting to a tracker is refused before anything is computed.
    with pytest.raises(SystemExit) as refused:
        evaluate.main(["fid", *common, str(folders["a"]), str(reference), "--log-to", str(folders["b"])])
    assert refused.value.code == 2 and "no tracker.json" in capsys.readouterr().err


def test_two_processes_extract_and_score_as_one(folders, extractor_file, pin, tmp_path, capsys):
    """Each process keeps its features: mu and sigma are its sums reduced over both (equal to one process's to
    float64 rounding, 1e-12), and only the main process receives the rows a file or KID, precision/recall and the
    Inception Score need (equal to one process's exactly)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"]
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}

    def two_processes(*words: str) -> str:
        run = subprocess.run([*launch, "evaluate.py", *words], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stdout
    two_processes("stats", *common, str(folders["a"]), "--out", str(tmp_path / "two.npz"))
    assert evaluate.main(["stats", *common, str(folders["a"]), "--out", str(tmp_path / "one.npz")]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(one["features"], two["features"])
    for name in ("mu", "sigma"):
        np.testing.assert_allclose(two[name], one[name], rtol=0, atol=1e-12 * np.abs(one[name]).max())
    words = ["metrics", *common, "--kid", "--pr", "--is", str(folders["b"]), str(tmp_path / "one.npz")]
    scores_two = json.loads(two_processes(*words).strip().splitlines()[-1])
    capsys.readouterr()
    assert evaluate.main(words) == 0
    scores_one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores_two == pytest.approx(scores_one, rel=1e-9)


def test_sweep_scores_every_combination_and_resumes(tiny_unet_run, shapes_dir, extractor_file, pin, tmp_path,
                                                    capsys):
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    reference = tmp_path / "shapes.npz"
    assert evaluate.main(["stats", *common, str(shapes_dir), "--out", str(reference)]) == 0
    tracked = tmp_path / "tensorboard_run"         # a training run that reports to TensorBoard (its record)
    tracked.mkdir()
    (tracked / "tracker.json").write_text(json.dumps({"report_to": "tensorboard", "project": "p", "run_name": "r",
                                                      "exported_step": 300}))
    sweep = ["sweep", *common, "--unet", str(tiny_unet_run), "--ref", str(reference), "--steps", "1,2",
             "--cfg-scales", "1,2", "--num-samples", "64", "--kid", "--pr", "--out", str(tmp_path / "sweep"),
             "--log-to", str(tracked)]
    assert evaluate.main(sweep) == 0
    out = tmp_path / "sweep"
    rows = json.loads((out / "sweep.json").read_text())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tracked / "logs" / "p"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/fid_steps_2_cfg_2")] == \
        [(300, pytest.approx(rows["steps_2_cfg_2"]["fid"]))]
    assert events.Images("eval/sweep_plot")[0].step == 300
    assert set(rows) == {"steps_1_cfg_1", "steps_2_cfg_1", "steps_1_cfg_2", "steps_2_cfg_2"}
    assert all(r["num_samples"] == 64 and r["fid"] > 0 and "kid" in r and "recall" in r for r in rows.values())
    table = (out / "sweep.md").read_text()
    assert "| steps | cfg_scale | fid | kid | precision | recall |" in table
    assert table.count("\n| ") == 6                       # the header, the rule and 4 rows
    with Image.open(out / "sweep.png") as plot:
        assert plot.size == (720, 480)
    # Run again: nothing is sampled or scored anew.
    made = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")}
    assert evaluate.main(sweep) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")} == made
    assert json.loads((out / "sweep.json").read_text()) == rows


def test_sweep_takes_the_condition_flags_and_checks_them_before_anything_runs(shapes_dir, tiny_vae_run, extractor_file,
                                                                               pin, tmp_path, capsys):
    """A mask-conditioned model sweeps with --masks (one sample per mask, whatever --num-samples says);
    without them, or with a prompt, the sweep stops in one line before any reference or sample is made."""
    import shutil

    import train_unet
    run = tmp_path / "mask_run"
    train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                     str(run), "--report-to", "none", "--max-steps", "1", "cond.type=mask",
                     "train.checkpoint_every=1", "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}"])
    capsys.readouterr()
    masks = tmp_path / "masks"
    masks.mkdir()
    sources = sorted((shapes_dir / "masks").rglob("*.png"))
    for i in range(70):             # more images than the 64-d stand-in features, as the Frechet distance needs
        shutil.copy(sources[i % len(sources)], masks / f"{i:02d}.png")
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    sweep = ["sweep", *common, "--unet", str(run), "--ref", str(shapes_dir), "--steps", "1,2", "--num-samples", "64",
             "--out", str(tmp_path / "sweep")]
    for flags, message in (([], "is mask-conditioned: pass --masks DIR"),
                           (["--prompt", "a red circle"], "is a 'mask'-conditioned model, not text-conditioned"),
                           (["--masks", str(masks), "--steps", "1,3"], "shortcut sampling needs a power of two"),
                           (["--masks", str(masks), "--cfg-scales", "1,x"], "--cfg-scales 1,x: expected")):
        assert evaluate.main([*sweep, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "sweep").exists()
    assert evaluate.main([*sweep, "--masks", str(masks)]) == 0
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(rows) == {"steps_1_cfg_1", "steps_2_cfg_1"} and all(r["num_samples"] == 70 for r in rows.values())
    assert "70 samples per cell" in (tmp_path / "sweep" / "sweep.md").read_text()
    made = {p: p.stat().st_mtime_ns for p in (tmp_path / "sweep" / "samples").rglob("*.png")}
    made[tmp_path / "sweep" / "sweep.json"] = (tmp_path / "sweep" / "sweep.json").stat().st_mtime_ns
    assert len(made) == 141
    assert evaluate.main([*sweep, "--masks", str(masks)]) == 0      # resumed: nothing sampled or scored anew
    assert {p: p.stat().st_mtime_ns for p in made} == made


def test_fid_and_validation_loss_during_training(shapes_dir, tiny_vae_run, extractor_file, pin, tmp_path,
                                                 monkeypatch):
    """eval.every: FID of the sampling EMA at 1, 4 and 8 steps and the held-out loss per level are
    logged; the FID equals evaluate.py's on the same images made by sample.py (the same seeds)."""
    from accelerate import Accelerator

    import train_unet
    from modules.eval.training import EVAL_SEED
    reference = tmp_path / "shapes.npz"
    assert evaluate.main(["stats", "--inception", str(extractor_file), *pin, "--image-size", str(SIZE),
                          str(shapes_dir), "--out", str(reference)]) == 0
    logged = {}
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw:
                        logged.setdefault(step, {}).update(values))
    out = tmp_path / "run"
    train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                     str(out), "--report-to", "none", "--max-steps", "4", "cond.type=class",
                     "train.checkpoint_every=4", "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}",
                     "eval.every=2", f"eval.reference={reference}", f"eval.inception={extractor_file}",
                     f"eval.inception_sha256={pin[1]}", "eval.num_samples=6", f"eval.image_size={SIZE}",
                     "eval.val_images=4"])
    for step in (2, 4):
        assert {"fid/steps_1", "fid/steps_4", "fid/steps_8", "val/loss_flow", "val/loss_by_level_3"} <= set(logged[step])
    assert logged[2]["fid/steps_1"] != logged[4]["fid/steps_1"]
    samples = tmp_path / "samples"
    import sample
    sample.main(["--unet", str(out), "--out", str(samples), "--num-samples", "6", "--steps", "1",
                 "--seed", str(EVAL_SEED)])
    extractor = load_pinned(extractor_file)
    feats = folder_features(samples, extractor, image_size=SIZE)
    expected = frechet_distance(*feature_statistics(feats), *load_stats(reference))
    assert logged[4]["fid/steps_1"] == pytest.approx(expected, rel=1e-6)


def test_fid_during_training_when_a_process_has_no_image_to_make(shapes_dir, tiny_vae_run, extractor_file, pin,
                                                                  tmp_path):
    """Three processes, eval.num_samples=2: the third makes none of the images, yet calls the network as
    often as the others (stand-in batches, dropped), and the logged FIDs equal one process's on the
    exported EMA. A text model's empty-prompt buffer is broadcast by DDP at the first forward after a
    training step; the process without images skipped it, and the run hung or paired the wrong messages."""
    import contextlib
    import json
    import os
    import re
    import signal

    from accelerate import Accelerator

    from modules.config.io import from_dict
    from modules.config.schema import UNetRunConfig
    from modules.core.generation import GenerationSpec
    from modules.data.latent_store import LatentStore
    from modules.eval.training import TrainingEvaluator
    from modules.interop.vae import load_vae
    from modules.run.export import load_network, read_network_export
    from scripts.tiny_clip import write_tiny_clip
    clip = write_tiny_clip(tmp_path / "clip" / "sd")
    reference = tmp_path / "shapes.npz"
    assert evaluate.main(["stats", "--inception", str(extractor_file), *pin, "--image-size", str(SIZE),
                          str(shapes_dir), "--out", str(reference)]) == 0
    root = Path(evaluate.__file__).parent
    launch = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml",
         "--num_processes", "3", "train_unet.py", "--config", "tiny", "--data", str(shapes_dir), "--vae",
         str(tiny_vae_run), "--output-dir", str(tmp_path / "run"), "--report-to", "none", "--max-steps", "4",
         "cond.type=text", f"cond.text_encoder={clip}", "train.batch_size=3", "train.checkpoint_every=2",
         "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}", "eval.every=2", "eval.steps=1",
         f"eval.reference={reference}", f"eval.inception={extractor_file}", f"eval.inception_sha256={pin[1]}",
         "eval.num_samples=2", "eval.batch_size=1", f"eval.image_size={SIZE}"],
        cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = launch.communicate(timeout=150)      # about 20 s; a hang is what this test catches
    except subprocess.TimeoutExpired:
        launch.kill()       # and its workers, which torch's launcher starts in sessions of their own
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                if str(tmp_path / "run").encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
        launch.communicate()
        pytest.fail("the three-process run with evaluation hung")
    assert launch.returncode == 0, stderr[-3000:]
    assert "3 process(es)" in stderr
    logged = dict(re.findall(r"(fid/steps_\d+) ([0-9.e+-]+)", stderr.split("step 4: ")[1].splitlines()[0]))
    run = tmp_path / "run"
    cfg = from_dict(UNetRunConfig, json.loads((run / "config.json").read_text()))
    vae = load_vae(run / "frozen_vae").eval()
    latents = LatentStore(next((tmp_path / "cache").glob("store_*")), hflip=False)
    export = read_network_export(run / "unet_ema")
    evaluator = TrainingEvaluator(cfg, Accelerator(cpu=True), GenerationSpec.of(cfg, export.sizes), latents,
                                  vae.normalize)
    expected = evaluator.fid(load_network(run / "unet_ema", export).eval(), vae)
    assert logged.keys() == expected.keys() == {"fid/steps_1"}
    for key, value in expected.items():
        assert float(logged[key]) == pytest.approx(value, rel=1e-3), key     # logged to 4 digits


def test_fid_during_training_needs_a_vouched_inception():
    from modules.config.io import load_config
    from modules.config.schema import ConfigError, UNetRunConfig
    with pytest.raises(ConfigError, match="eval.inception_sha256"):
        load_config(UNetRunConfig, "unet", "tiny", ["eval.every=10", "eval.reference=ref.npz", "eval.inception=x.pt"])


# ----------------------------------------------------------------------------- resolution, references, writes

def uniform_images(folder: Path, n: int, size: int, seed: int) -> Path:
    """``n`` smooth random RGB PNGs, all ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{i:03d}.png")
    return folder


def test_a_reference_of_another_resolution_is_refused_naming_both_sizes(tmp_path, extractor_file, pin, capsys):
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    ref32, samples24 = uniform_images(tmp_path / "ref32", 70, 32, seed=1), uniform_images(tmp_path / "s24", 70, 24, 2)
    stats = tmp_path / "ref32.npz"
    assert evaluate.main(["stats", *common, str(ref32), "--out", str(stats)]) == 0
    assert load_source_size(stats) == (32, 32)
    capsys.readouterr()
    for reference in (stats, ref32):                      # a statistics file, an image folder
        assert evaluate.main(["fid", *common, str(samples24), str(reference)]) == 2
        err = capsys.readouterr().err
        assert "24x24 px" in err and "32x32 px" in err and "--allow-other-resolution" in err, err
    assert evaluate.main(["metrics", *common, "--allow-other-resolution", str(samples24), str(stats)]) == 0
    extractor = load_pinned(extractor_file)
    expected = frechet_distance(*feature_statistics(folder_features(samples24, extractor, image_size=SIZE)),
                                *load_stats(stats))
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["fid"] == pytest.approx(expected, rel=1e-6)
    # Statistics without a recorded size (pytorch-fid's, clean-fid's) are not refused.
    mu, sigma = load_stats(stats)
    np.savez(tmp_path / "unrecorded.npz", mu=mu, sigma=sigma)
    assert evaluate.main(["fid", *common, str(samples24), str(tmp_path / "unrecorded.npz")]) == 0


def test_a_sweep_against_a_reference_of_another_resolution_is_refused_before_sampling(
        tiny_unet_run, tmp_path, extractor_file, pin, capsys):
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    stats = tmp_path / "ref24.npz"
    assert evaluate.main(["stats", *common, str(uniform_images(tmp_path / "ref24", 8, 24, 1)), "--out",
                          str(stats)]) == 0
    capsys.readouterr()
    assert evaluate.main(["sweep", *common, "--unet", str(tiny_unet_run), "--ref", str(stats), "--steps", "1",
                          "--num-samples", "64", "--out", str(tmp_path / "sweep")]) == 2
    assert "32x32 px" in capsys.readouterr().err and not (tmp_path / "sweep").exists()


def test_training_fid_against_a_reference_of_another_resolution_warns(tmp_path, extractor_file, pin, caplog):
    import logging
    from types import SimpleNamespace

    from modules.config.io import load_config
    from modules.config.schema import UNetRunConfig
    from modules.eval.training import TrainingEvaluator
    stats = save_stats(tmp_path / "ref24.npz", np.zeros(64), np.eye(64), source_size=(24, 24))
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["eval.every=10", f"eval.reference={stats}", "data.image_size=32",
                                                      f"eval.inception={extractor_file}", f"eval.inception_sha256={pin[1]}"])
    with caplog.at_level(logging.WARNING, logger="modules.eval.training"):
        TrainingEvaluator(cfg, SimpleNamespace(device="cpu", is_main_process=True), None, None, 1.0)
    assert "24x24 px" in caplog.text and "32x32 px" in caplog.text
    caplog.clear()
    same = save_stats(tmp_path / "ref32.npz", np.zeros(64), np.eye(64), source_size=(32, 32))
    cfg.eval.reference = str(same)
    with caplog.at_level(logging.WARNING, logger="modules.eval.training"):
        TrainingEvaluator(cfg, SimpleNamespace(device="cpu", is_main_process=True), None, None, 1.0)
    assert caplog.text == ""


def test_references_from_a_datasets_folder_and_an_adm_npz_equal_the_image_folder(tmp_path, extractor_file, pin):
    import datasets
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    folder = uniform_images(tmp_path / "images", 12, 24, seed=3)
    files = list_images(folder)
    table = datasets.Dataset.from_dict({"image": [str(f) for f in files], "label": list(range(len(files)))})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    np.savez(tmp_path / "adm.npz", arr_0=np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    made = {}
    for name, reference in (("folder", folder), ("saved", tmp_path / "saved"), ("adm", tmp_path / "adm.npz")):
        assert evaluate.main(["stats", *common, str(reference), "--out", str(tmp_path / f"{name}.npz")]) == 0
        made[name] = np.load(tmp_path / f"{name}.npz")
    extractor = load_pinned(extractor_file)
    expected = folder_features(folder, extractor, image_size=SIZE)
    for name, arrays in made.items():           # PNG is lossless: the same pixels, the same features
        np.testing.assert_array_equal(arrays["features"], expected.astype(np.float32), err_msg=name)
        assert arrays["source_size"].tolist() == [24, 24], name


def rlimited(limit: int):
    def apply():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_statistics_write_on_a_full_disk_is_one_line_and_leaves_no_partial_file(folders, tmp_path, extractor_file,
                                                                                    pin):
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    # Files may not grow past 4 KiB (EFBIG, as ENOSPC on a full disk); the statistics need ~60 KiB.
    for command in (["stats", *common, str(folders["a"]), "--out", str(tmp_path / "stats.npz")],
                    ["fid", *common, "--save-stats", str(tmp_path / "stats.npz"), str(folders["a"]), str(folders["b"])]):
        res = subprocess.run([sys.executable, "evaluate.py", *command], cwd=REPO, capture_output=True, text=True,
                             timeout=120, preexec_fn=rlimited(4096))
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert res.stderr.splitlines()[-1].startswith(f"error: could not write statistics file {tmp_path / 'stats.npz'}")
        assert sorted(p.name for p in tmp_path.iterdir()) == [], command[0]


def test_a_failed_sweep_write_is_one_line_and_keeps_what_was_scored(tiny_unet_run, shapes_dir, extractor_file, pin,
                                                                    tmp_path, capsys):
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]
    reference = tmp_path / "shapes.npz"
    assert evaluate.main(["stats", *common, str(shapes_dir), "--out", str(reference)]) == 0
    out = tmp_path / "sweep"
    sweep = ["sweep", *common, "--unet", str(tiny_unet_run), "--ref", str(reference), "--steps", "1",
             "--num-samples", "64", "--out", str(out)]
    out.mkdir()
    for name in ("sweep.json", "sweep.md", "sweep.png"):     # a folder in the way: every write fails, as root too
        (out / name).mkdir()
        capsys.readouterr()
        assert evaluate.main(sweep) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith(f"error: could not write {out / name}") and "Traceback" not in err
        (out / name).rmdir()
        if name != "sweep.json":                             # the scores were kept before the report failed
            assert json.loads((out / "sweep.json").read_text())["steps_1_cfg_1"]["num_samples"] == 64
        assert not list(out.glob(".*.tmp"))
    assert evaluate.main(sweep) == 0
    assert (out / "sweep.md").is_file() and Image.open(out / "sweep.png").size == (720, 480)


def test_kid_standard_error_is_the_spread_over_subsets():
    """The standard error of the mean over subsets, against subsets drawn and scored by loops
    (the way KID's reference implementations compute it: the unbiased MMD^2 per subset)."""
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(50, 6)) + 0.2
    subsets, size = 7, 20
    kid, error = kernel_inception_distance(a, b, num_subsets=subsets, max_subset_size=size, seed=3)
    generator = torch.Generator().manual_seed(3)
    values = []
    for _ in range(subsets):      # the same subsets: rows drawn with the function's seeded generator
        x = a[torch.randperm(len(a), generator=generator)[:size].numpy()]
        y = b[torch.randperm(len(b), generator=generator)[:size].numpy()]
        values.append(mmd2_unbiased_loops(x, y))
    mean = sum(values) / subsets
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (subsets - 1))
    assert kid == pytest.approx(mean, rel=1e-9)
    assert error == pytest.approx(spread / math.sqrt(subsets), rel=1e-9)
    assert math.isnan(kernel_inception_distance(a, b, num_subsets=1, max_subset_size=size)[1])


def test_sweep_over_the_guidance_scale_of_an_imf_model(tiny_imf_run, shapes_dir, extractor_file, pin, tmp_path,
                                                       capsys):
    """An iMF model takes w as an input: --cfg-scales sweeps it, each cell's samples made at that w and the
    --guidance-interval given (their request.json); without --cfg-scales the one column is imf.sample_scale at
    imf.sample_interval; a reversed interval stops the sweep in one line before anything is made."""
    common = ["--inception", str(extractor_file), *pin, "--image-size", str(SIZE), "--workers", "1"]

    def sweep(out, *extra):
        return evaluate.main(["sweep", *common, "--unet", str(tiny_imf_run), "--ref", str(shapes_dir), "--steps", "1",
                              "--num-samples", "64", "--out", str(tmp_path / out), *extra])

    assert sweep("w", "--cfg-scales", "2,4", "--guidance-interval", "0.2", "0.7") == 0
    rows = json.loads((tmp_path / "w" / "sweep.json").read_text())
    assert set(rows) == {"steps_1_cfg_2", "steps_1_cfg_4"} and all(r["fid"] > 0 for r in rows.values())
    for name, w in (("steps_1_cfg_2", 2.0), ("steps_1_cfg_4", 4.0)):
        request = json.loads((tmp_path / "w" / "samples" / name / "request.json").read_text())
        assert (request["cfg_scale"], request["guidance_interval"]) == (w, [0.2, 0.7])
    assert sweep("default") == 0
    assert set(json.loads((tmp_path / "default" / "sweep.json").read_text())) == {"steps_1_cfg_8"}
    request = json.loads((tmp_path / "default" / "samples" / "steps_1_cfg_8" / "request.json").read_text())
    assert (request["cfg_scale"], request["guidance_interval"]) == (8.0, [0.35, 0.6])
    capsys.readouterr()
    assert sweep("reversed", "--guidance-interval", "0.7", "0.2") == 2
    assert "--guidance-interval 0.7 0.2: must be two times" in capsys.readouterr().err
    assert not (tmp_path / "reversed").exists()
