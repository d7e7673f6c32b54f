"""Issue 21, evaluation: each test is an attack on evaluate.py or the training evaluator, as a user
would make it (a command line or a call), and what must happen instead (RELIABILITY.md, rules 1-7)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import evaluate
from modules import durable
from modules.errors import MetricsError
from modules.eval.features import list_images, save_stats

REPO = Path(__file__).resolve().parent.parent
SIZE = 32                   # the extractor sees 32 px images
WIDTH = 8                   # its features: 8-d, so a dozen samples make a covariance


class TinyExtractor(nn.Module):
    """Inception's call convention on a fixed random conv: 0..255 images -> [B, 8] features, or 10 class
    probabilities."""

    def __init__(self, channels: int = WIDTH // 2):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, channels, 5, stride=2)
        self.classes = nn.Linear(2 * channels, 10)

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_bias: bool = False) -> torch.Tensor:
        h = torch.tanh(self.conv(x / 127.5 - 1))
        feats = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return feats if return_features else torch.softmax(self.classes(feats) * 20, dim=1)


@pytest.fixture(scope="module")
def common(tmp_path_factory) -> list[str]:
    """The command-line words of every evaluate.py call here: the tiny extractor, vouched for."""
    path = tmp_path_factory.mktemp("extractor") / "tiny.pt"
    torch.jit.script(TinyExtractor().eval()).save(str(path))
    return ["--inception", str(path), "--inception-sha256", hashlib.sha256(path.read_bytes()).hexdigest(),
            "--image-size", str(SIZE), "--workers", "1"]


def images(folder: Path, n: int, seed: int, size: int = 32) -> Path:
    """``n`` smooth random RGB PNGs of ``size`` px."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{i:03d}.png")
    return folder


def refused(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def swept(tiny_unet_run, shapes_dir, common, tmp_path_factory) -> dict:
    """One finished sweep (1 step, guidance 1, 12 samples, FID only) against the shapes' statistics."""
    root = tmp_path_factory.mktemp("swept")
    reference = root / "shapes.npz"
    assert evaluate.main(["stats", *common, str(shapes_dir), "--out", str(reference)]) == 0
    words = ["sweep", *common, "--unet", str(tiny_unet_run), "--steps", "1", "--num-samples", "12"]
    assert evaluate.main([*words, "--ref", str(reference), "--out", str(root / "sweep")]) == 0
    return {"out": root / "sweep", "reference": reference, "words": words}


def copy_of(swept: dict, tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    shutil.copytree(swept["out"], out, symlinks=True)
    (out / ".lock").unlink(missing_ok=True)
    return out


def pngs(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")}


def cell(out: Path) -> dict:
    return json.loads((out / "sweep.json").read_text())["steps_1_cfg_1"]


def fid_of(folder: Path, reference: Path, common: list[str], capsys) -> float:
    capsys.readouterr()
    assert evaluate.main(["fid", *common, str(folder), str(reference)]) == 0
    return float(capsys.readouterr().out.split()[-1])


# ----------------------------------------------------------------------------- rule 1: keyed by every input

def test_a03_a_sweep_rerun_against_another_reference_scores_against_it(swept, common, tmp_path, capsys):
    """A03: the same sweep again with another --ref showed the old scores under the new reference's name."""
    out = copy_of(swept, tmp_path)
    made, before = pngs(out / "samples"), cell(out)
    other = tmp_path / "other.npz"
    assert evaluate.main(["stats", *common, str(images(tmp_path / "other", 16, seed=7)), "--out", str(other)]) == 0
    assert evaluate.main([*swept["words"], "--ref", str(other), "--out", str(out)]) == 0
    after = cell(out)
    expected = fid_of(out / "samples" / "steps_1_cfg_1", other, common, capsys)
    assert after["fid"] == pytest.approx(expected, rel=1e-5) and after["fid"] != pytest.approx(before["fid"])
    assert after["key"] != before["key"]
    assert pngs(out / "samples") == made                  # the samples are kept: only the scores are new
    # Back to the first reference: its scores again (recomputed from the kept samples).
    assert evaluate.main([*swept["words"], "--ref", str(swept["reference"]), "--out", str(out)]) == 0
    assert cell(out)["fid"] == pytest.approx(before["fid"], rel=1e-9) and cell(out)["key"] == before["key"]


def test_a03_a_row_of_another_key_is_never_shown(swept, common, tmp_path):
    """A sweep.json row whose key does not match the cell's inputs (edited, or of another sweep) is scored again."""
    out = copy_of(swept, tmp_path)
    table = json.loads((out / "sweep.json").read_text())
    table["steps_1_cfg_1"]["fid"] = 12345.0
    table["steps_1_cfg_1"]["key"] = "0" * 64
    (out / "sweep.json").write_text(json.dumps(table))
    assert evaluate.main([*swept["words"], "--ref", str(swept["reference"]), "--out", str(out)]) == 0
    assert cell(out)["fid"] == pytest.approx(json.loads((swept["out"] / "sweep.json").read_text())
                                             ["steps_1_cfg_1"]["fid"], rel=1e-9)
    assert "12345" not in (out / "sweep.md").read_text()


# ----------------------------------------------------------------------------- rule 2: output folders

def test_the_sweep_claims_its_out_folder(swept, tiny_unet_run, tmp_path, capsys):
    """The sweep's --out is claimed like a run's: a second sweep on it, or a model folder, is one line, before
    anything is sampled."""
    out = copy_of(swept, tmp_path)
    assert durable.output_kind(out) == "sweep"
    lock = durable.claim_output(out, "sweep")
    try:
        capsys.readouterr()
        assert evaluate.main([*swept["words"], "--ref", str(swept["reference"]), "--out", str(out)]) == 2
        refused(capsys, "in use")
    finally:
        lock.release()
    model = tiny_unet_run / "unet_ema"
    listing = sorted(p.name for p in model.iterdir())
    assert evaluate.main([*swept["words"], "--ref", str(swept["reference"]), "--out", str(model)]) == 2
    refused(capsys, "model folder")
    assert sorted(p.name for p in model.iterdir()) == listing


def test_the_statistics_probe_never_writes_through_a_planted_link(shapes_dir, common, tmp_path):
    """The check that --out can be written made a file under a name one can predict (its pid): a link planted
    there truncated the file it pointed to."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "ref.npz"
    (tmp_path / f".{out.name}.{os.getpid()}.probe").symlink_to(victim)
    assert evaluate.main(["stats", *common, str(shapes_dir), "--out", str(out)]) == 0
    assert victim.read_text() == "precious" and out.is_file()


# ----------------------------------------------------------------------------- rule 3: masks/ are not images

def test_a05_masks_are_not_counted_as_reference_images(tmp_path, common):
    """A05: the example data's flat layout (images, masks/ paired by name, no metadata): 2x the images."""
    from scripts.shapes import make_shapes
    data = make_shapes(tmp_path / "flat", 12, image_size=32, seed=0, layout="flat")
    assert (data / "masks").is_dir() and len(list((data / "masks").rglob("*.png"))) == 12
    files = list_images(data)
    assert len(files) == 12 and not any("masks" in f.relative_to(data).parts for f in files)
    assert evaluate.main(["stats", *common, str(data), "--out", str(tmp_path / "ref.npz")]) == 0
    assert np.load(tmp_path / "ref.npz")["features"].shape == (12, WIDTH)


# ----------------------------------------------------------------------------- rule 4: paths stay inside

def test_a04_listed_paths_outside_the_folder_are_refused(shapes_dir, common, tmp_path, capsys):
    """A04: a folder holding only a manifest that names the reference's own images (absolute, or ../) scored
    FID 0; metadata files too."""
    reference = images(tmp_path / "ref", 12, seed=1)
    names = sorted(p.name for p in reference.iterdir())
    attacks = {
        "absolute": ("manifest.jsonl", "".join(json.dumps({"file": str(reference / n)}) + "\n" for n in names)),
        "dotdot": ("manifest.jsonl", "".join(json.dumps({"file": f"../ref/{n}"}) + "\n" for n in names)),
        "jsonl": ("metadata.jsonl", "".join(json.dumps({"file_name": f"../ref/{n}"}) + "\n" for n in names)),
        "csv": ("metadata.csv", "file_name\n" + "".join(f"{reference / n}\n" for n in names)),
    }
    for attack, (name, text) in attacks.items():
        crafted = tmp_path / attack
        crafted.mkdir()
        (crafted / name).write_text(text)
        capsys.readouterr()
        assert evaluate.main(["fid", *common, str(crafted), str(reference)]) == 2, attack
        refused(capsys, name, names[0], "outside")
        with pytest.raises(MetricsError, match="outside"):
            list_images(crafted)


# ----------------------------------------------------------------------------- rule 5: numbers and files bounded

@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "100000000"),
                                         ("--image-size", "1000000"), ("--workers", "0"),
                                         ("--workers", "1000000000")])
def test_every_number_is_bounded_before_anything_runs(shapes_dir, common, tmp_path, capsys, flag, value):
    assert evaluate.main(["stats", *common, flag, value, str(shapes_dir), "--out", str(tmp_path / "r.npz")]) == 2
    refused(capsys, flag, value)
    assert not (tmp_path / "r.npz").exists()


@pytest.mark.parametrize("flag, value", [("--num-samples", "100000000000"), ("--num-samples", "0"),
                                         ("--sample-batch-size", "0"), ("--seed", str(2 ** 128)),
                                         ("--seed", "-1")])
def test_every_sweep_number_is_bounded_before_anything_runs(swept, tmp_path, capsys, flag, value):
    words = [w for w in swept["words"] if w not in ("--num-samples", "12")]
    assert evaluate.main([*words, flag, value, "--ref", str(swept["reference"]), "--out", str(tmp_path / "s")]) == 2
    refused(capsys, flag, value)
    assert not (tmp_path / "s").exists()


class ZipReads:
    """Counts the bytes decompressed from .npz members."""

    def __init__(self, monkeypatch):
        self.total = 0
        real = zipfile.ZipExtFile.read

        def read(member, n=-1):
            data = real(member, n)
            self.total += len(data)
            return data
        monkeypatch.setattr(zipfile.ZipExtFile, "read", read)


def test_a17_a_reference_is_read_once_and_only_what_is_needed(common, tmp_path, capsys, monkeypatch):
    """A17: every array of a reference was decompressed several times (a 1.9 MB file took 2.2 GB and 24 s)."""
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(size=(64, WIDTH)), np.zeros((200_000, WIDTH))]).astype(np.float32)
    reference = tmp_path / "ref.npz"
    np.savez_compressed(reference, mu=features.mean(0).astype(np.float64),
                        sigma=np.cov(features, rowvar=False), features=features,
                        source_size=np.array([32, 32]))
    assert reference.stat().st_size < features.nbytes / 20      # compresses well, like the attack's file
    samples = images(tmp_path / "samples", 12, seed=3)
    reads = ZipReads(monkeypatch)
    assert evaluate.main(["fid", *common, str(samples), str(reference)]) == 0
    assert reads.total < features.nbytes / 10, reads.total      # FID needs mu and sigma only
    reads.total = 0
    assert evaluate.main(["metrics", *common, "--kid", str(samples), str(reference)]) == 0
    assert features.nbytes <= reads.total < 1.2 * features.nbytes, reads.total     # the features, once


class ReferenceReads:
    """Every way a reference file's values can be read, counted: np.load (never used), each array mapped from the
    file (``np.memmap``, by offset), bytes decompressed from it, and whole-file hashes."""

    def __init__(self, monkeypatch, reference: Path):
        self.loads, self.maps, self.hashes, self.zip = 0, {}, 0, ZipReads(monkeypatch)
        real_load, real_map, real_hash = np.load, np.memmap, durable.sha256_file

        def load(file, *args, **kwargs):
            self.loads += Path(file) == reference if isinstance(file, (str, Path)) else 1
            return real_load(file, *args, **kwargs)

        def memmap(file, *args, **kwargs):
            if Path(file) == reference:
                self.maps[kwargs["offset"]] = self.maps.get(kwargs["offset"], 0) + 1
            return real_map(file, *args, **kwargs)

        def sha256_file(path):
            self.hashes += Path(path) == reference
            return real_hash(path)
        monkeypatch.setattr(np, "load", load)
        monkeypatch.setattr(np, "memmap", memmap)
        monkeypatch.setattr(durable, "sha256_file", sha256_file)


def test_a_reference_is_read_once_per_command_even_a_sweep(swept, common, tmp_path, capsys, monkeypatch):
    """Issue 22: a 1.28M-image reference (10.5 GB) was read ~7 times per score. Now, as `stats` writes it: each
    array is mapped from the file once (features only when KID or precision/recall asks), nothing is decompressed
    but the arrays' headers, and the file is never hashed (a sweep keys its rows by mu, sigma and the arrays'
    sizes and CRC-32s from the zip directory)."""
    reference = swept["reference"]
    samples = images(tmp_path / "samples", 12, seed=3)
    reads = ReferenceReads(monkeypatch, reference)
    assert evaluate.main(["metrics", *common, "--kid", "--pr", "--is", str(samples), str(reference)]) == 0
    assert reads.loads == 0 and reads.hashes == 0 and reads.zip.total < 4096, vars(reads)
    assert sorted(reads.maps.values()) == [1, 1, 1, 1]                  # mu, sigma, features, source_size: once
    reads.maps.clear()
    assert evaluate.main(["fid", *common, str(samples), str(reference)]) == 0
    assert sorted(reads.maps.values()) == [1, 1, 1]                     # FID never reads the features
    reads.maps.clear()
    out = copy_of(swept, tmp_path)
    assert evaluate.main([*swept["words"], "--kid", "--ref", str(reference), "--out", str(out)]) == 0
    assert "kid" in cell(out) and reads.hashes == 0 and sorted(reads.maps.values()) == [1, 1, 1, 1], vars(reads)


def write_npz_member(zf: zipfile.ZipFile, name: str, header: dict, payload: bytes) -> None:
    buffer = __import__("io").BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    zf.writestr(name, buffer.getvalue() + payload)


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
@pytest.mark.parametrize("shape", [(10 ** 13,), (10 ** 7,), (2 ** 62, 2 ** 62)])
def test_a21_an_array_header_claiming_too_many_values_is_refused_before_reading(common, tmp_path, capsys, shape,
                                                                                 compression):
    """A21: a member whose header claims 10^13 values (or more than the member holds) is refused from its
    header, before anything is allocated or decompressed."""
    reference = tmp_path / "ref.npz"
    with zipfile.ZipFile(reference, "w", compression) as zf:
        write_npz_member(zf, "mu.npy", {"descr": "<f8", "fortran_order": False, "shape": shape}, b"\0" * 64)
        write_npz_member(zf, "sigma.npy", {"descr": "<f8", "fortran_order": False, "shape": (1, 1)}, b"\0" * 8)
    samples = images(tmp_path / "samples", 12, seed=3)
    assert evaluate.main(["fid", *common, str(samples), str(reference)]) == 2
    refused(capsys, "'mu'", str(reference))


def test_a21_a_reference_of_pickled_objects_is_refused(common, tmp_path, capsys):
    reference = tmp_path / "ref.npz"
    np.savez(reference, mu=np.array([object()], dtype=object), sigma=np.eye(1))
    assert evaluate.main(["fid", *common, str(images(tmp_path / "s", 12, seed=3)), str(reference)]) == 2
    refused(capsys, "mu")


# ----------------------------------------------------------------------------- rule 6: checks at start-up

def test_a12_a_reference_of_another_feature_width_stops_training_at_start_up(tmp_path, common):
    """A12: training ran until its first evaluation, then stopped there without that step's checkpoint."""
    from types import SimpleNamespace

    from modules.config.io import load_config
    from modules.config.schema import UNetRunConfig
    from modules.eval.training import TrainingEvaluator, prepare_fid
    inception, sha = common[1], common[3]
    reference = save_stats(tmp_path / "ref64.npz", np.zeros(64), np.eye(64), source_size=(32, 32))
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["eval.every=10", f"eval.reference={reference}",
                                                      f"eval.inception={inception}", f"eval.inception_sha256={sha}",
                                                      f"eval.image_size={SIZE}"])
    accelerator = SimpleNamespace(device="cpu", is_main_process=True)
    with pytest.raises(MetricsError, match=r"64-d .* 8-d|8-d .* 64-d") as err:
        TrainingEvaluator(cfg, accelerator, None, None, 1.0)
    assert str(reference) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MetricsError, match="64-d"):          # what a run calls before its latent cache
        prepare_fid(cfg, accelerator)
    cfg.eval.reference = str(save_stats(tmp_path / "ref8.npz", np.zeros(WIDTH), np.eye(WIDTH), source_size=(32, 32)))
    TrainingEvaluator(cfg, accelerator, None, None, 1.0)


def test_a12_a_sweep_against_a_reference_of_another_feature_width_stops_before_sampling(swept, tmp_path, capsys):
    reference = save_stats(tmp_path / "ref64.npz", np.zeros(64), np.eye(64), source_size=(32, 32))
    assert evaluate.main([*swept["words"], "--ref", str(reference), "--out", str(tmp_path / "s")]) == 2
    refused(capsys, "64-d", f"{WIDTH}-d")
    assert not (tmp_path / "s").exists()


def test_a_sweep_of_fewer_samples_than_feature_dimensions_stops_before_sampling(swept, tmp_path, capsys):
    """The FID of fewer samples than the features have dimensions is meaningless: known before sampling."""
    words = [w for w in swept["words"] if w not in ("--num-samples", "12")]
    assert evaluate.main([*words, "--num-samples", "4", "--ref", str(swept["reference"]), "--out",
                          str(tmp_path / "s")]) == 2
    refused(capsys, "--num-samples 4", f"{WIDTH}-d")
    assert not (tmp_path / "s").exists()


def test_a07_kid_needs_features_the_reference_lacks_before_sampling(swept, tmp_path, capsys):
    reference = save_stats(tmp_path / "stats_only.npz", *[np.load(swept["reference"])[k] for k in ("mu", "sigma")],
                           source_size=(32, 32))
    assert evaluate.main([*swept["words"], "--kid", "--ref", str(reference), "--out", str(tmp_path / "s")]) == 2
    refused(capsys, "features")
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------- rule 7: no traceback

def test_a07_a_sweep_rerun_with_kid_scores_the_cells_scored_without_it(swept, tmp_path, capsys):
    """A07: a rerun with --kid over cells scored without it: KeyError: 'kid' after all the sampling (when a new
    cell came first in the report)."""
    out = copy_of(swept, tmp_path)
    made = pngs(out / "samples")
    words = [*swept["words"], "--ref", str(swept["reference"]), "--out", str(out)]
    assert evaluate.main([*words, "--steps", "2,1", "--kid", "--pr"]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert all({"kid", "kid_std_error", "precision", "recall"} <= set(row) for row in rows.values())
    assert "| steps | cfg_scale | fid | kid | precision | recall |" in (out / "sweep.md").read_text()
    assert {p: t for p, t in pngs(out / "samples").items() if p in made} == made    # the old cell: not sampled again
    # Without the flags again: the rows are kept (they hold what is asked), and the report shows what is asked.
    before = (out / "sweep.json").read_text()
    assert evaluate.main([*words, "--steps", "2,1"]) == 0
    assert (out / "sweep.json").read_text() == before
    assert "| steps | cfg_scale | fid |\n" in (out / "sweep.md").read_text()


def test_a32_a_byte_order_mark_in_metadata_csv_is_read_as_training_reads_it(tmp_path, common, capsys):
    reference = images(tmp_path / "ref", 12, seed=1)
    (reference / "extra.png").write_bytes((reference / "000.png").read_bytes())    # not listed: left out
    names = sorted(p.name for p in reference.iterdir() if p.name != "extra.png")
    (reference / "metadata.csv").write_text("file_name,label\n" + "".join(f"{n},0\n" for n in names),
                                            encoding="utf-8-sig")
    assert [f.name for f in list_images(reference)] == names
    assert evaluate.main(["stats", *common, str(reference), "--out", str(tmp_path / "r.npz")]) == 0
    (reference / "metadata.csv").write_bytes(b"file_name\n" + "caf\xe9.png\n".encode("latin-1"))
    assert evaluate.main(["stats", *common, str(reference), "--out", str(tmp_path / "r.npz")]) == 2
    refused(capsys, "metadata.csv", "UTF-8")
    (reference / "metadata.csv").unlink()
    (reference / "manifest.jsonl").write_bytes(json.dumps({"file": "caf\xe9.png"}, ensure_ascii=False)
                                               .encode("latin-1") + b"\n")
    assert evaluate.main(["stats", *common, str(reference), "--out", str(tmp_path / "r.npz")]) == 2
    refused(capsys, "manifest.jsonl", "UTF-8")


def test_a08_a_two_process_sweep_waits_for_the_manifest(tiny_unet_run, swept, tmp_path):
    """A08: README's `accelerate launch evaluate.py sweep`: a rank listed the sample folder before the main
    process had written its manifest (failed 3 of 3)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml",
               "evaluate.py", *swept["words"], "--steps", "1,2", "--ref", str(swept["reference"]), "--out",
               str(tmp_path / "sweep")]
    launch = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _, stderr = launch.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launch.pid, signal.SIGKILL)
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):       # workers in sessions of their own
            with contextlib.suppress(OSError):
                if str(tmp_path / "sweep").encode() in cmdline.read_bytes():
                    os.kill(int(cmdline.parent.name), signal.SIGKILL)
        launch.communicate()
        pytest.fail("the two-process sweep hung")
    assert launch.returncode == 0, stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert set(rows) == {"steps_1_cfg_1", "steps_2_cfg_1"} and all(r["num_samples"] == 12 for r in rows.values())
    # The same FID as one process's, on the same images.
    assert rows["steps_1_cfg_1"]["fid"] == pytest.approx(cell(swept["out"])["fid"], rel=1e-6)
