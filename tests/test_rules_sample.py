"""Issue 21's rules for sample.py, one test per finding (A-numbers are the issue's): the output folder is
claimed and written only through the write module (rule 2: a lock held for the whole run, part files
never opened through a link), folders keep their roles (rule 3: not a data folder, not in a model
folder), the request is keyed by the content of its conditions (rule 1), numbers and files are bounded
where they are read (rule 5: seeds, counts, masks decoded per batch), and nothing a user can cause is
a traceback (rule 7: a damaged request.json, odd class labels)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from modules import durable
from modules.config.cli import run_cli

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def cli(capsys, *argv) -> tuple[int, str]:
    """sample.py's command line, in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        run_cli(sample.main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def refused(capsys, *argv) -> str:
    """The one ``error:`` line of a refused command (exit 2, no traceback)."""
    code, err = cli(capsys, *argv)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def succeeded(capsys, *argv) -> str:
    code, err = cli(capsys, *argv)
    assert code == 0, err[-3000:]
    return err


def png_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png")) if p.name != "grid.png"}


def write_masks(folder: Path, count: int, size: int = 32, flip: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        mask[: size // 2 if not flip else size, (i % size): (i % size) + 4] = 255
        if flip:
            mask = 255 - mask
        Image.fromarray(mask).save(folder / f"m{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def mask_unet(shapes_dir, tiny_vae_run, tmp_path_factory) -> Path:
    """A mask-conditioned tiny shortcut model (one step of training is enough to sample from)."""
    import train_unet
    out = tmp_path_factory.mktemp("mask_unet") / "unet"
    train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                     str(out), "--report-to", "none", "--max-steps", "1", "cond.type=mask",
                     "train.checkpoint_every=1", "train.image_log_every=100",
                     f"cache_dir={tmp_path_factory.mktemp('mask_cache')}"])
    return out


# ----------------------------------------------------------------------------- rule 2: claimed, one writer

def test_a01_a_second_sample_run_on_a_folder_in_use_is_refused(tiny_unet_run, tmp_path, capsys):
    """Two ``--overwrite`` runs on one --out mixed one request's request.json, the other's manifest and PNGs
    of both. The first run holds the folder's lock until it ends; the second is refused in one line, and
    the first finishes a folder of its own request only."""
    out = tmp_path / "s"
    first = subprocess.Popen([sys.executable, "sample.py", "--unet", str(tiny_unet_run), "--out", str(out),
                              "--num-samples", "60", "--steps", "8", "--batch-size", "1", "--overwrite"],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(out.glob("0*.png")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the first run ended before the second could start"
        line = refused(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 3, "--steps", 2,
                       "--seed", 1, "--overwrite")
        assert str(out) in line and "in use" in line, line
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    request = json.loads((out / "request.json").read_text())
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert request["count"] == 60 and request["seed"] == 0 and request["steps"] == 8
    assert len(manifest) == 60 and all(r["steps"] == 8 for r in manifest)
    # The lock is the kernel's: once the first run has ended, the folder is free again.
    succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 3, "--steps", 2, "--overwrite")


def test_a06_links_planted_in_the_out_folder_are_never_written_through(tiny_unet_run, tmp_path, capsys):
    """A link planted under the name of a manifest part (a file, or the .parts folder itself) made sample.py
    append its records to a file outside --out. Every file is written through the write module or opened
    without following a link; a planted link is replaced, what it points to is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("precious\n")
    for case in ("part_file", "parts_folder"):
        out = tmp_path / case
        out.mkdir()
        if case == "part_file":
            (out / ".parts").mkdir()
            (out / ".parts" / "rank_0.jsonl").symlink_to(victim)
        else:
            (out / ".parts").symlink_to(outside, target_is_directory=True)
        succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2)
        assert victim.read_text() == "precious\n", case
        assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"], case
        assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    # And every other name sample.py writes in a folder it continues or replaces.
    out = tmp_path / "every_name"
    succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2)
    names = ["request.json", "manifest.jsonl", "000000.png", "grid.png", "samples.npz", durable.OUTPUT_MARKER]
    for name in names:
        target = outside / f"{name}.target"
        target.write_text("precious\n")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(target)
    code, err = cli(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2, "--seed", 3, "--overwrite",
                    "--grid", "--npz")
    assert code == 0, err[-3000:]
    for name in names:
        assert (outside / f"{name}.target").read_text() == "precious\n", name
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 2
    # A link planted as the lock is refused in one line (the write module never opens it), and left alone.
    lock_target = outside / "lock.target"
    lock_target.write_text("precious\n")
    (out / ".lock").unlink(missing_ok=True)
    (out / ".lock").symlink_to(lock_target)
    line = refused(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2, "--seed", 4, "--overwrite")
    assert ".lock" in line and lock_target.read_text() == "precious\n", line


# ----------------------------------------------------------------------------- rule 3: roles

def test_a13_an_out_folder_of_training_images_is_refused(tiny_unet_run, shapes_dir, tmp_path, capsys):
    """sample.py wrote its PNGs into a folder of JPEG training images (the next training run trained on
    them). An --out holding images that sample.py did not write is refused, with or without --overwrite,
    naming one; nothing is written into it."""
    data = tmp_path / "jpegs"
    data.mkdir()
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(data / f"photo_{i}.jpg")
    before = sorted(p.name for p in data.iterdir())
    for extra in ((), ("--overwrite",)):
        line = refused(capsys, "--unet", tiny_unet_run, "--out", data, "--num-samples", 2, *extra)
        assert "photo_0.jpg" in line, line
        assert sorted(p.name for p in data.iterdir()) == before
    # A data set of class folders too (the images are one level down).
    classes = tmp_path / "classes"
    shutil.copytree(shapes_dir, classes)
    line = refused(capsys, "--unet", tiny_unet_run, "--out", classes, "--num-samples", 2, "--overwrite")
    assert str(classes) in line and ".png" in line, line
    # A folder sample.py filled itself is continued and replaced as before (its grid.png included).
    out = tmp_path / "own"
    succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2, "--grid")
    succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2, "--grid")
    succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 1, "--seed", 4, "--overwrite")
    assert sorted(png_bytes(out)) == ["000000.png"]


def test_a40_out_in_a_model_folder_or_a_runs_export_is_refused(tiny_unet_run, tmp_path, capsys):
    """`--out runs/u/unet_ema` was accepted, and the next export deleted the samples. A model folder, a
    folder inside one, and a training run's export (or checkpoint) folder, made yet or not, are refused."""
    run = tmp_path / "run"
    shutil.copytree(tiny_unet_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    for out in (run / "unet_ema", run / "unet_ema" / "samples", run / "frozen_vae", run / "unet"):
        line = refused(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 1)
        assert "unet" in line or "vae" in line, line
    assert not (run / "unet_ema" / "samples").exists()
    # A run folder whose exports do not exist yet: its export names are the run's all the same.
    fresh = tmp_path / "fresh_run"
    durable.claim_output(fresh, "run").release()
    for name in ("unet_ema", "unet", "vae", "checkpoints"):
        line = refused(capsys, "--unet", tiny_unet_run, "--out", fresh / name / "s", "--num-samples", 1)
        assert str(fresh / name) in line, line
        assert not (fresh / name).exists()
    # The run folder itself is the run's (claimed for a run: durable.OUTPUT_MARKER).
    assert "holds a run output" in refused(capsys, "--unet", tiny_unet_run, "--out", run, "--num-samples", 1)
    # Samples beside the exports, in a folder of their own, are fine.
    succeeded(capsys, "--unet", tiny_unet_run, "--out", run / "samples", "--num-samples", 1)


# ----------------------------------------------------------------------------- rule 1: identity

def test_a45_masks_replaced_under_the_same_names_are_another_request(mask_unet, tmp_path, capsys, caplog):
    """Masks replaced under the same names kept the old images ("0 by this run", exit 0): the request
    is keyed by the masks' pixels as read, so the same command is now another request."""
    masks, out = tmp_path / "masks", tmp_path / "s"
    write_masks(masks, 3)
    succeeded(capsys, "--unet", mask_unet, "--out", out, "--masks", masks)
    old = png_bytes(out)
    succeeded(capsys, "--unet", mask_unet, "--out", out, "--masks", masks)      # unchanged: continued, kept
    assert png_bytes(out) == old
    write_masks(masks, 3, flip=True)
    line = refused(capsys, "--unet", mask_unet, "--out", out, "--masks", masks)
    assert "--overwrite" in line, line
    with caplog.at_level("INFO", logger="sample"):
        succeeded(capsys, "--unet", mask_unet, "--out", out, "--masks", masks, "--overwrite")
    assert "3 images (3 by this run)" in caplog.text, caplog.text
    assert png_bytes(out).keys() == old.keys()


def test_a45_prompts_are_keyed_by_their_text():
    """The request holds a fingerprint of the prompts' text (every prompt, not the first lines)."""
    a = sample.conditions_identity(None, ["a red circle", "a blue square"])
    assert a == sample.conditions_identity(None, ["a red circle", "a blue square"])
    assert a != sample.conditions_identity(None, ["a red circle", "a blue squares"])
    assert a != sample.conditions_identity(None, ["a red circle"])


# ----------------------------------------------------------------------------- rule 7: no traceback

@pytest.mark.parametrize("damage", ["invalid_json", "not_an_object", "not_utf8", "wrong_types"])
def test_a25_a_damaged_request_json_is_another_request(tiny_unet_run, tmp_path, capsys, damage):
    """A damaged request.json (invalid JSON, a list, non-UTF-8 bytes, wrongly typed fields) was a
    traceback. It is another request: refused in one line without --overwrite, replaced with it."""
    out = tmp_path / "s"
    succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2)
    content = {"invalid_json": b"{\"count\": 2,", "not_an_object": b"[1, 2]", "not_utf8": b"{\"a\": \"\xff\xfe\"}",
               "wrong_types": json.dumps({"count": "two", "seed": [0], "steps": None}).encode()}[damage]
    (out / "request.json").write_bytes(content)
    line = refused(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2)
    assert "request.json" in line and "--overwrite" in line, line
    succeeded(capsys, "--unet", tiny_unet_run, "--out", out, "--num-samples", 2, "--overwrite")
    assert json.loads((out / "request.json").read_text())["count"] == 2


@pytest.mark.parametrize("label", ["²", "--1", "١", "1e3", " 1", "0x1", pytest.param("1" * 5000, id="5000_digits")])
def test_a24_odd_class_labels_are_one_line(label, tmp_path, capsys):
    """`--class-label=²` passed str.isdigit() and ended in a traceback; `=--1` too. Only ASCII digits,
    'all' and 'random' are labels; the rest is refused before anything is loaded."""
    line = refused(capsys, "--unet", tmp_path / "never_read", "--out", tmp_path / "s", f"--class-label={label}")
    assert "--class-label" in line, line
    assert not (tmp_path / "s").exists()


def test_a24_negative_class_label_is_one_line(tiny_unet_run, tmp_path, capsys):
    line = refused(capsys, "--unet", tiny_unet_run, "--out", tmp_path / "s", "--class-label=-1")
    assert "--class-label" in line, line


# ----------------------------------------------------------------------------- rule 5: bounded where parsed

def test_a39_one_line_of_a_prompts_file_is_one_prompt(tmp_path):
    """str.splitlines() split a line at U+2028, U+0085, form feeds ...: only '\\n' ends a prompt (and a
    '\\r' before it is dropped, for files written on Windows)."""
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red\u2028circle\na blue\x85square\x0c on grey\r\n\n  \nlast".encode())
    args = sample.build_parser().parse_args(["--unet", "u", "--out", "o", "--prompts", str(path)])
    assert sample.read_prompts(args) == ["a red\u2028circle", "a blue\x85square\x0c on grey", "last"]
    # Read a line at a time, and a line is bounded (a file without a newline is not read whole).
    path.write_text("short\n" + "x" * (sample.MAX_PROMPT_CHARS + 1))
    with pytest.raises(sample.ConfigError, match="line 2 is longer than"):
        sample.read_prompts(args)
    path.write_text("x" * sample.MAX_PROMPT_CHARS + "\n")
    assert len(sample.read_prompts(args)[0]) == sample.MAX_PROMPT_CHARS


@pytest.mark.parametrize("flag,value,needle", [
    ("--seed", -1, "--seed"), ("--seed", 2 ** 128, "--seed"), ("--batch-size", 10 ** 9, "--batch-size"),
    ("--steps", 10 ** 11, "--steps"), ("--steps", 0, "--steps"), ("--num-samples", 0, "--num-samples"),
    ("--batch-size", 0, "--batch-size")])
def test_a23_numbers_are_bounded_where_they_are_parsed(flag, value, needle, tmp_path, capsys):
    """Seeds (A23: >= 2^64 or negative), --steps, --batch-size, --num-samples: one line before anything is
    loaded or created."""
    line = refused(capsys, "--unet", tmp_path / "never_read", "--out", tmp_path / "s", f"{flag}={value}")
    assert needle in line, line
    assert not (tmp_path / "s").exists()


def test_a23_large_seeds_below_the_bound_use_every_bit(tiny_unet_run, tmp_path, capsys):
    for seed in (2 ** 64, 2 ** 64 + 1, 2 ** 128 - 1):
        succeeded(capsys, "--unet", tiny_unet_run, "--out", tmp_path / str(seed), "--num-samples", 1, "--seed", seed)
    images = [png_bytes(tmp_path / str(seed))["000000.png"] for seed in (2 ** 64, 2 ** 64 + 1, 2 ** 128 - 1)]
    assert len(set(images)) == 3


def test_a18_masks_are_decoded_per_batch(mask_unet, tmp_path, capsys, monkeypatch):
    """3000 masks took 1.98 GB against 0.38 GB for 30: they were all decoded and held before sampling.
    Now every mask is read once at start-up (unreadable ones are refused before anything is made) and
    dropped, then decoded again for its batch: at most a batch of decoded masks is alive at any time."""
    masks = write_masks(tmp_path / "masks", 40)
    alive, most = [0], [0]

    def gone():
        alive[0] -= 1

    real = sample.mask_tensor

    def counting(*args, **kwargs):
        tensor = real(*args, **kwargs)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(tensor, gone)
        return tensor

    monkeypatch.setattr(sample, "mask_tensor", counting)
    succeeded(capsys, "--unet", mask_unet, "--out", tmp_path / "s", "--masks", masks, "--batch-size", 4)
    assert len(png_bytes(tmp_path / "s")) == 40
    assert most[0] <= 2 * 4, f"{most[0]} decoded masks alive at once"
    # An unreadable mask is still refused at start-up, before any image is made.
    (masks / "m039.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    line = refused(capsys, "--unet", mask_unet, "--out", tmp_path / "t", "--masks", masks)
    assert "m039.png" in line, line
    assert not any((tmp_path / "t").glob("*.png"))


# ----------------------------------------------------------------------------- A42: pixels and batches

def test_a42_an_image_does_not_depend_on_the_batch_it_was_made_in(tiny_unet_run, tmp_path, capsys):
    """Image i was made in whatever batch the work list gave it, and pixels differed by a grey level with
    the batch's size. Every batch has exactly --batch-size rows (a short last batch is padded), and each
    prompt is encoded alone, so a rerun that makes a few missing images, or another process count,
    gives the bytes of an uninterrupted run."""
    args = ["--unet", tiny_unet_run, "--num-samples", 48, "--steps", 8, "--batch-size", 16, "--seed", 5]
    out = tmp_path / "s"
    succeeded(capsys, *args, "--out", out)
    whole = png_bytes(out)
    for i in (1, 2, 43):
        (out / f"{i:06d}.png").unlink()
    succeeded(capsys, *args, "--out", out)
    assert png_bytes(out) == whole


def test_names_read_from_a_manifest_stay_in_the_folder(tmp_path):
    """Rule 4: a manifest line naming ../x.png or /abs/x.png does not count as a finished image (its file
    would be read outside the folder), nor does a line naming another image's file."""
    from modules.data.image_io import save_png
    from modules.run.sample_folder import SampleFolder
    outside = tmp_path / "elsewhere.png"
    save_png(np.zeros((4, 4, 3), np.uint8), outside)
    request = {"count": 4, "model": "m"}
    folder = SampleFolder(tmp_path / "s", request, rank=0)
    folder.open(overwrite=False)
    save_png(np.zeros((4, 4, 3), np.uint8), folder.out / "000003.png")
    lines = [{"index": 0, "file": "../elsewhere.png"}, {"index": 1, "file": str(outside)},
             {"index": 2, "file": "000003.png"}, {"index": 3, "file": "000003.png"}]
    (folder.out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    finished = SampleFolder(tmp_path / "s", request, rank=0).open(False, file_of=lambda i: f"{i:06d}.png")
    assert finished.tolist() == [3]
