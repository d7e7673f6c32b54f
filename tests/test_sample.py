"""sample.py end to end on a tiny trained model: files, manifest, determinism, refusals."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from modules.config.cli import run_cli
from modules.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    sample.main([*map(str, args)])


def read_pngs(folder):
    return {p.name: np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob("0*.png"))}


def test_writes_images_and_manifest(tiny_unet_run, tmp_path):
    run("--unet", tiny_unet_run, "--out", tmp_path / "s", "--num-samples", 5, "--steps", 2, "--grid",
        "--class-label", 1, "--cfg-scale", 1.5)
    pngs = read_pngs(tmp_path / "s")
    lines = [json.loads(line) for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert len(pngs) == 5 and len(lines) == 5
    assert {line["file"] for line in lines} == set(pngs)
    assert all(line["steps"] == 2 and line["sampler"] == "shortcut" and line["guidance"] == 1.5
               and line["condition"] == 1 for line in lines)
    assert next(iter(pngs.values())).shape == (32, 32, 3)
    assert (tmp_path / "s" / "grid.png").is_file()


def test_same_seed_same_images_whatever_the_batch_size(tiny_unet_run, tmp_path):
    for batch in (1, 3, 7):
        run("--unet", tiny_unet_run, "--out", tmp_path / f"b{batch}", "--num-samples", 7, "--steps", 4,
            "--batch-size", batch, "--seed", 5)
    reference = read_pngs(tmp_path / "b7")
    for batch in (1, 3):
        other = read_pngs(tmp_path / f"b{batch}")
        assert other.keys() == reference.keys()
        for name in reference:
            assert np.abs(other[name] - reference[name]).max() <= 2, name
    run("--unet", tiny_unet_run, "--out", tmp_path / "seed6", "--num-samples", 7, "--steps", 4, "--seed", 6)
    assert any(np.abs(read_pngs(tmp_path / "seed6")[n] - reference[n]).max() > 2 for n in reference)


def test_every_sampler_of_the_objective_runs(tiny_unet_run, tmp_path):
    for sampler, steps in [("shortcut", 8), ("euler", 3), ("heun", 2)]:
        run("--unet", tiny_unet_run, "--out", tmp_path / sampler, "--num-samples", 2, "--steps", steps,
            "--sampler", sampler)
        assert len(read_pngs(tmp_path / sampler)) == 2


def refusal(capsys, *args):
    with pytest.raises(SystemExit) as info:
        run_cli(sample.main, [*map(str, args)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: ")
    return err.splitlines()[-1]


def test_refusals(tiny_unet_run, tiny_vae_run, tmp_path, capsys):
    unet = ["--unet", tiny_unet_run]
    assert "power of two" in refusal(capsys, *unet, "--out", tmp_path / "a", "--steps", 3)
    assert "exceeds the trained maximum of 8" in refusal(capsys, *unet, "--out", tmp_path / "a", "--steps", 16)
    assert "classes 0..2" in refusal(capsys, *unet, "--out", tmp_path / "a", "--class-label", 3)
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(masks / "m.png")
    assert "not mask-conditioned" in refusal(capsys, *unet, "--out", tmp_path / "a", "--masks", masks)
    assert "does not fit a shortcut model" in refusal(capsys, *unet, "--out", tmp_path / "a", "--sampler", "ddim")
    run(*unet, "--out", tmp_path / "full", "--num-samples", 1)
    capsys.readouterr()
    # The same command again continues (nothing left to make); another request needs --overwrite.
    assert "--overwrite" in refusal(capsys, *unet, "--out", tmp_path / "full", "--num-samples", 1, "--steps", 2)
    run(*unet, "--out", tmp_path / "full", "--num-samples", 1, "--steps", 2, "--overwrite")
    # A VAE other than the recorded one, with another architecture, is refused naming the field.
    other = tmp_path / "other_vae"
    shutil.copytree(tiny_vae_run / "vae", other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["scale_factor"] = 0.5
    (other / "config.json").write_text(json.dumps(config))
    assert "scale_factor" in refusal(capsys, *unet, "--vae", other, "--out", tmp_path / "b")
    assert "does not exist" in refusal(capsys, *unet, "--vae", tmp_path / "gone", "--out", tmp_path / "b")


def test_guidance_for_a_model_trained_without_condition_dropout_is_refused(shapes_dir, tiny_vae_run, tmp_path,
                                                                          capsys):
    """cond.drop=0 trains no unconditional prediction: --cfg-scale 2 is refused in one line, and the model
    still loads and samples at scale 1."""
    import train_unet
    run = tmp_path / "run"
    train_unet.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                     str(run), "--report-to", "none", "--max-steps", "1", "cond.type=class", "cond.drop=0",
                     "train.checkpoint_every=1", "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}"])
    capsys.readouterr()
    assert "trained with cond.drop=0" in refusal(capsys, "--unet", run, "--out", tmp_path / "a", "--cfg-scale", 2)
    run_cli(sample.main, ["--unet", str(run), "--out", str(tmp_path / "b"), "--num-samples", "2"])
    assert len(read_pngs(tmp_path / "b")) == 2


def test_cli_help_and_error_exit():
    result = subprocess.run([sys.executable, "sample.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "--cfg-scale" in result.stdout
    result = subprocess.run([sys.executable, "sample.py", "--unet", "/nonexistent", "--out", "/tmp/x"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "error:" in result.stderr and "Traceback" not in result.stderr


def test_gif_masks_are_read_as_training_reads_them(tmp_path):
    """sample.py --masks takes every image file type training takes (.gif included; it skipped them)."""
    from modules.data.image_io import mask_tensor
    folder = tmp_path / "masks"
    folder.mkdir()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 4:12] = 255
    Image.fromarray(mask).save(folder / "a.gif")
    Image.fromarray(255 - mask).save(folder / "b.png")
    names, masks = sample.load_masks(folder, 16)
    assert names == ["a", "b"] and masks.shape == (2, 1, 16, 16)
    assert torch.equal(masks[0], mask_tensor(folder / "a.gif", 16)) and masks[0].sum() == 8 * 4


def test_colliding_mask_names_are_refused(tmp_path):
    """m.png, m.jpg and m.PNG would all write m.png: one would silently replace the others."""
    folder = tmp_path / "masks"
    folder.mkdir()
    for name in ("m.png", "m.jpg", "n.png"):
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / name)
    with pytest.raises(ConfigError, match="m.jpg, m.png would write the same output file"):
        sample.load_masks(folder, 16)


def test_bfloat16_weights_give_nearly_the_float32_images(tiny_unet_run, tmp_path):
    """--dtype bfloat16 (the default on CUDA): bf16 weights and compute, float32 latent updates."""
    for dtype in ("float32", "bfloat16"):
        run("--unet", tiny_unet_run, "--out", tmp_path / dtype, "--num-samples", 4, "--steps", 4, "--dtype", dtype)
    full, half = read_pngs(tmp_path / "float32"), read_pngs(tmp_path / "bfloat16")
    errors = [np.abs(full[n] - half[n]).mean() for n in full]
    assert 0 < max(errors) < 1, errors    # mean absolute difference in 0..255 levels; measured 0.09-0.14


def read_manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def same_folder(a, b):
    """The same images (within 2/255: batches differ) and the same manifest."""
    assert read_manifest(a) == read_manifest(b)
    pa, pb = read_pngs(a), read_pngs(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert np.abs(pa[name] - pb[name]).max() <= 2, name


def test_two_processes_write_the_same_folder_as_one(tiny_unet_run, tmp_path):
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    args = ["sample.py", "--unet", str(tiny_unet_run), "--num-samples", "7", "--steps", "2", "--batch-size", "2",
            "--class-label", "random", "--npz"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"]
    result = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run(*args[1:], "--out", tmp_path / "one")
    same_folder(tmp_path / "one", tmp_path / "two")
    labels = [r["condition"] for r in read_manifest(tmp_path / "one")]
    assert set(labels) <= {0, 1, 2} and labels != [i % 3 for i in range(7)]      # drawn by seed, recorded
    arrays = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert arrays.shape == (7, 32, 32, 3) and arrays.dtype == np.uint8
    assert np.array_equal(arrays[3], read_pngs(tmp_path / "two")["000003.png"].astype(np.uint8))


def test_a_killed_run_continues_where_it_stopped(tiny_unet_run, tmp_path):
    import os
    import signal
    import time
    args = ["--unet", str(tiny_unet_run), "--num-samples", "12", "--steps", "8", "--batch-size", "1"]
    run(*args, "--out", tmp_path / "straight")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "sample.py", *args, "--out", str(out)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while len(list(out.glob("0*.png"))) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    made = len(list(out.glob("0*.png")))
    assert 4 <= made < 12 and not (out / "manifest.jsonl").exists(), made
    listed = [json.loads(line)["file"] for line in (out / ".parts" / "rank_0.jsonl").read_text().splitlines()]
    kept = {name: (out / name).stat().st_mtime_ns for name in listed}
    run(*args, "--out", out)
    same_folder(tmp_path / "straight", out)
    assert {name: (out / name).stat().st_mtime_ns for name in listed} == kept     # not made again
    assert not (out / ".parts").exists()


def test_class_label_all_spreads_the_classes_evenly_and_records_the_ones_used(tiny_unet_run, tmp_path):
    run("--unet", tiny_unet_run, "--out", tmp_path / "all", "--num-samples", 7, "--class-label", "all")
    labels = [r["condition"] for r in read_manifest(tmp_path / "all")]
    counts = np.bincount(labels, minlength=3)
    assert len(counts) == 3 and counts.max() - counts.min() <= 1, labels
    # The recorded label is the one the image was made with: image i equals image i of a
    # one-class run (same seed) exactly when that class is the recorded one.
    made = read_pngs(tmp_path / "all")
    for label in range(3):
        run("--unet", tiny_unet_run, "--out", tmp_path / f"class{label}", "--num-samples", 7, "--class-label", label)
        one_class = read_pngs(tmp_path / f"class{label}")
        same = [np.abs(made[name] - one_class[name]).max() <= 2 for name in sorted(made)]
        assert same == [recorded == label for recorded in labels], (label, labels, same)


def test_num_samples_has_a_sanity_bound(tiny_unet_run, tmp_path, capsys):
    line = refusal(capsys, "--unet", tiny_unet_run, "--out", tmp_path / "a", "--num-samples", 100_000_000)
    assert "--num-samples 100000000" in line and "at most 10000000" in line
    assert not (tmp_path / "a").exists()


def test_the_work_list_is_lazy_whatever_the_count(tmp_path):
    """m3: 10^7 images requested, three finished: the to-do iteration holds the three, not the count."""
    import itertools
    import tracemalloc

    from modules.data.image_io import save_png
    from modules.run.sample_folder import SampleFolder, pending
    count, request = 10 ** 7, {"count": 10 ** 7, "model": "m"}
    first = SampleFolder(tmp_path / "s", request, rank=0)
    first.open(overwrite=False)
    for i in (0, 1, 5):
        save_png(np.zeros((4, 4, 3), np.uint8), first.out / f"{i:06d}.png")
        first.record({"index": i, "file": f"{i:06d}.png"})
    first.close()
    tracemalloc.start()
    finished = SampleFolder(tmp_path / "s", request, rank=0).open(overwrite=False)
    shares = [list(itertools.islice(pending(count, finished, rank, 2), 4)) for rank in (0, 1)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert finished.tolist() == [0, 1, 5]
    assert shares == [[2, 4, 7, 9], [3, 6, 8, 10]]
    assert peak < 2 ** 20, f"{peak} bytes to start a run of {count} images"
    # The same shares as the eager list it replaces, for every process of three.
    todo = [i for i in range(40) if i not in (0, 1, 5)]
    assert [list(pending(40, finished, rank, 3)) for rank in range(3)] == [todo[r::3] for r in range(3)]


def test_compiled_sampling_gives_the_images_of_eager_sampling(tiny_unet_run, tmp_path, monkeypatch):
    """--compile (torch.compile of the UNet and the VAE decoder) changes speed, not images. The test
    compiles with the aot_eager backend (LDM_COMPILE_BACKEND): graph capture and AOT autograd as
    in production, without inductor's code generation, which takes minutes on a CPU."""
    from torch._dynamo.utils import counters

    from modules.core.compiling import COMPILE_BACKEND_ENV
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    common = ["--unet", tiny_unet_run, "--num-samples", 2, "--steps", 1, "--seed", 3]
    run(*common, "--out", tmp_path / "eager")
    counters.clear()
    run(*common, "--out", tmp_path / "compiled", "--compile")
    assert counters["stats"]["unique_graphs"] >= 2          # the UNet and the decoder ran compiled
    torch._dynamo.reset()
    eager, compiled = read_pngs(tmp_path / "eager"), read_pngs(tmp_path / "compiled")
    assert eager.keys() == compiled.keys() and len(eager) == 2
    for name in eager:
        assert np.abs(compiled[name] - eager[name]).max() <= 2, name
