"""Smoke test of benchmarks/quality.py: the whole pipeline at the ``micro`` preset, and its numbers
re-derived from the files it wrote (a plain numpy IoU, and the Frechet distance through the
nuclear norm of the centred feature product instead of an eigendecomposition)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import quality  # noqa: E402


def frechet_by_nuclear_norm(a: np.ndarray, b: np.ndarray) -> float:
    """With centred features A, B scaled by 1/sqrt(n - 1): cov_a = A^T A, cov_b = B^T B and
    tr sqrt(cov_a cov_b) is the sum of the singular values of A B^T (exact at any rank)."""
    ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (ca ** 2).sum() + (cb ** 2).sum() - 2 * cross)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("quality") / "work"
    threads = torch.get_num_threads()
    report = quality.main(["--preset", "micro", "--workdir", str(work), "--device", "cpu"])
    assert torch.get_num_threads() == threads   # the run's one-thread setting does not leak
    return work, report


def test_report_has_every_model_and_step_count(micro_run):
    work, report = micro_run
    preset = quality.PRESETS["micro"]
    rows = [(r["model"], r["steps"]) for r in report["rows"] if r["steps"] is not None]
    assert rows == [(m, s) for m in quality.DEFAULT_VARIANTS for s in preset.steps]
    on_disk = json.loads((work / "results" / "quality.json").read_text())
    assert on_disk["rows"] == report["rows"]
    table = (work / "results" / "quality.md").read_text()
    assert "| shortcut | shortcut | 1 |" in table and "| flow | euler | 2 |" in table
    assert (work / "results" / "quality_grid.png").is_file()
    commands = [s["command"] for s in report["stages"]]
    assert any(c.startswith("python train_unet.py") and "objective=flow" in c for c in commands)


def test_clean_images_score_perfect_iou(micro_run):
    # foreground_mask recovers the exact mask of a clean shapes image: the metric's ceiling is 1.
    _, report = micro_run
    reference = next(r for r in report["rows"] if r["model"] == "reference: independent real set")
    assert reference["mask_iou"] == 1.0


def test_scores_match_an_independent_computation(micro_run):
    work, report = micro_run
    eval_dir = work / "data" / "eval"
    names = sorted(p.name for p in (eval_dir / "masks").iterdir())
    real = quality.read_images([eval_dir / n for n in names])
    masks = quality.read_masks([eval_dir / "masks" / n for n in names])
    generated = quality.read_images([work / "samples" / "flow_1" / n for n in names])
    row = next(r for r in report["rows"] if r["model"] == "flow" and r["steps"] == 1)

    fg = quality.foreground_mask(generated)
    ious = [(f & m).sum() / (f | m).sum() if (f | m).any() else 1.0 for f, m in zip(fg, masks)]
    assert row["mask_iou"] == pytest.approx(np.mean(ious), abs=1e-6)
    for name, features in quality.FEATURES.items():
        expected = frechet_by_nuclear_norm(features(generated), features(real))
        assert row[name] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_pixel_features_are_area_averages():
    image = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    image[0, :2, :2, 0] = 255                       # one 2x2 block of the 8x8 grid, red channel
    features = quality.pixel_features(image).reshape(3, 8, 8)
    assert features[0, 0, 0] == pytest.approx(1.0)
    assert features[0, 0, 1] == pytest.approx(-1.0)
    assert np.allclose(features[1:], -1.0)


def test_refuses_a_non_empty_workdir(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(SystemExit):
        quality.main(["--preset", "micro", "--workdir", str(tmp_path)])


def test_arch_dit_makes_the_same_table_with_dits(micro_run, tmp_path):
    """--arch dit: the same runs and rows, with DiTs (the micro run's VAE reused, as --vae allows)."""
    from modules.core.networks.dit import DiT
    from modules.run.export import load_network

    work, unet_report = micro_run
    report = quality.main(["--preset", "micro", "--arch", "dit", "--workdir", str(tmp_path / "dit"), "--device", "cpu",
                           "--vae", str(work / "vae")])
    assert report["arch"] == "dit" and unet_report["arch"] == "unet"
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [(r["model"], r["steps"]) for r in unet_report["rows"]]
    for objective in quality.DEFAULT_VARIANTS:
        assert isinstance(load_network(tmp_path / "dit" / f"unet_{objective}" / "unet_ema"), DiT)
    commands = [s["command"] for s in report["stages"] if s["name"].startswith("unet_")]
    assert len(commands) == 2 and all("model.arch=dit" in c for c in commands)


def test_cond_text_scores_prompt_fidelity(micro_run, tmp_path):
    """--cond text: the same runs conditioned on captions, one sample per held-out caption, and prompt
    fidelity re-derived here (the colour's hue through colorsys instead of the module's own formula)."""
    import colorsys

    from scripts.shapes import COLOURS, foreground_mask, shape_captions, shape_of

    work, unet_report = micro_run
    report = quality.main(["--preset", "micro", "--cond", "text", "--workdir", str(tmp_path / "t"), "--device", "cpu",
                           "--vae", str(work / "vae")])
    assert report["cond"] == "text"
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [(r["model"], r["steps"]) for r in unet_report["rows"]]
    commands = [s["command"] for s in report["stages"]]
    assert all("cond.type=text" in c for c in commands if c.startswith("python train_unet.py"))
    assert sum("--prompts" in c for c in commands) == len(quality.DEFAULT_VARIANTS) * len(quality.PRESETS["micro"].steps)
    assert "| prompt fidelity | colour | shape |" in (tmp_path / "t" / "results" / "quality.md").read_text()

    captions = shape_captions(8, 16, quality.EVAL_SEED)
    images = quality.read_images([tmp_path / "t" / "samples" / "shortcut_1" / f"{i:06d}.png" for i in range(8)])
    colour_ok, shape_ok = [], []
    for image, text in zip(images, captions):
        mask = foreground_mask(image)
        colour = None
        if mask.any():
            r, g, b = image[mask].astype(float).mean(0) / 255
            hue, saturation, _ = colorsys.rgb_to_hsv(r, g, b)
            colour = COLOURS[round(hue * 6) % 6] if saturation > 0 else None
        colour_ok.append(colour == text.split()[1])
        shape_ok.append(shape_of(mask) == text.split()[2])
    row = next(r for r in report["rows"] if r["model"] == "shortcut" and r["steps"] == 1)
    assert row["colour_match"] == pytest.approx(np.mean(colour_ok))
    assert row["shape_match"] == pytest.approx(np.mean(shape_ok))
    assert row["prompt_fidelity"] == pytest.approx(np.mean(np.array(colour_ok) & np.array(shape_ok)))
def test_variants_seeds_and_guidance_sweep(micro_run, tmp_path):
    """--variants/--seeds/--guidance, class-conditional (--cond class, what the OT rows need): one run per
    (variant, seed), iMF's on the in-context DiT; the summary is the mean, min and max over seeds of the per-run
    rows; the best scale of a variant has the lowest mean 1-step FD pixels and is sampled at every step count;
    class accuracy re-derived from the samples' manifest (the class sample.py recorded for each image)."""
    import json as json_lib

    from modules.run.export import read_network_export
    from scripts.shapes import SHAPES, foreground_mask, shape_of

    work, _ = micro_run
    report = quality.main(["--preset", "micro", "--cond", "class", "--workdir", str(tmp_path / "w"), "--device",
                           "cpu", "--vae", str(work / "vae"), "--variants", "shortcut+all,meanflow,imf", "--seeds",
                           "2", "--guidance", "2"])
    runs = [s["name"] for s in report["stages"] if s["name"].startswith("unet_")]
    assert runs == ["unet_shortcut+all", "unet_meanflow", "unet_imf", "unet_shortcut+all_seed1", "unet_meanflow_seed1",
                    "unet_imf_seed1"]
    assert read_network_export(tmp_path / "w" / "unet_imf" / "unet_ema").config.model.arch == "icdit"
    assert "| class accuracy |" in (tmp_path / "w" / "results" / "quality.md").read_text()
    folder = tmp_path / "w" / "samples" / "imf_1"
    records = [json_lib.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]
    images = quality.read_images([folder / r["file"] for r in records])
    expected = np.mean([shape_of(foreground_mask(image)) == SHAPES[r["condition"]]
                        for image, r in zip(images, records)])
    row = next(r for r in report["rows"] if r.get("variant") == "imf" and r["seed"] == 0 and r["steps"] == 1
               and r["guidance"] == 1.0)
    assert row["class_accuracy"] == pytest.approx(expected)
    rows = [r for r in report["rows"] if "variant" in r]
    for entry in report["summary"]:
        values = [r["fd_pixels"] for r in rows if (r["variant"], r["guidance"], r["steps"])
                  == (entry["variant"], entry["guidance"], entry["steps"])]
        assert len(values) == entry["seeds"] == 2
        assert entry["fd_pixels"]["mean"] == pytest.approx(np.mean(values))
        assert (entry["fd_pixels"]["min"], entry["fd_pixels"]["max"]) == (min(values), max(values))
    for variant, best in report["best_guidance"].items():
        one_step = {g: np.mean([r["fd_pixels"] for r in rows if r["variant"] == variant and r["steps"] == 1
                                and r["guidance"] == g]) for g in (1.0, 2.0)}
        assert best == min(one_step, key=one_step.get)
        assert {r["steps"] for r in rows if r["variant"] == variant and r["guidance"] == best} == {1, 2}
    assert set(report["seconds_per_step"]) == {"shortcut+all", "meanflow", "imf"}
    commands = " ".join(s["command"] for s in report["stages"])
    assert "shortcut.intrinsic_guidance=true shortcut.wavelet_levels=2 train.ot_pairing=true" in commands
    assert "cond.type=class" in commands and "cond.type=mask" not in commands


def test_ot_rows_need_class_conditioning(tmp_path):
    """train.ot_pairing pairs within each class: its rows are refused with masks and prompts, and left out of
    'all' there."""
    for cond in ("mask", "text"):
        with pytest.raises(SystemExit):
            quality.parse_args(["--workdir", str(tmp_path / cond), "--cond", cond, "--variants",
                                "shortcut,shortcut+ot"])
        chosen = quality.parse_args(["--workdir", str(tmp_path / cond), "--cond", cond, "--variants", "all"]).variants
        assert "shortcut+ot" not in chosen and "shortcut+all" not in chosen and "imf" in chosen
    chosen = quality.parse_args(["--workdir", str(tmp_path / "c"), "--cond", "class", "--variants", "all"]).variants
    assert chosen == tuple(quality.VARIANTS)


def test_ema_lengths_score_each_rebuilt_post_hoc_ema_at_one_step(micro_run, tmp_path):
    """--ema-lengths: every run keeps snapshots (ema.posthoc=true), each length is rebuilt by posthoc_ema.py's
    reconstruction into the run folder and sampled from there (the samples' request names its weights) at 1 step
    at the variant's best guidance; the best length is the one of lowest 1-step FD pixels."""
    from modules.run.export import read_config, weights_digest

    work, _ = micro_run
    report = quality.main(["--preset", "micro", "--cond", "class", "--workdir", str(tmp_path / "w"), "--device",
                           "cpu", "--vae", str(work / "vae"), "--variants", "shortcut,imf", "--guidance", "2",
                           "--ema-lengths", "0.05,0.1"])
    commands = [s["command"] for s in report["stages"] if s["name"].startswith("unet_")]
    assert len(commands) == 2 and all("ema.posthoc=true" in c for c in commands)
    rebuilt = [r for r in report["rows"] if r.get("ema_length") is not None]
    assert [(r["variant"], r["ema_length"], r["steps"]) for r in rebuilt] == [
        (v, length, 1) for v in ("shortcut", "imf") for length in (0.05, 0.1)]
    for r in rebuilt:
        assert r["guidance"] == report["best_guidance"][r["variant"]]
        export = tmp_path / "w" / f"unet_{r['variant']}" / f"unet_phema_{r['ema_length']:g}"
        assert json.loads((export / "config.json").read_text())["posthoc_ema"]["sigma_rel"] == r["ema_length"]
        folder = quality.samples_dir(tmp_path / "w", quality.Run(r["variant"], 0, r["ema_length"]).name, 1,
                                     r["guidance"])
        request = json.loads((folder / "request.json").read_text())
        assert request["unet_weights"] == weights_digest(read_config(export)) is not None
    for variant, best in report["best_ema_length"].items():
        scores = {r["ema_length"]: r["fd_pixels"] for r in rebuilt if r["variant"] == variant}
        assert best == min(scores, key=scores.get)
    assert "| imf, post-hoc EMA 0.1 |" in (tmp_path / "w" / "results" / "quality.md").read_text()
