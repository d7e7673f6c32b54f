"""The GPU benchmarks run at CPU smoke sizes: every row is produced, ours and diffusers alike.

They measure speed, which a CPU here says nothing about (BENCHMARKS.md has the GPU commands);
what is checked is that the scripts run and report both models, and that the compared networks
really have the widths they claim.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_sample  # noqa: E402
import bench_unet  # noqa: E402
import bench_vae  # noqa: E402


def test_bench_sample_times_ours_and_diffusers(capsys):
    pytest.importorskip("diffusers")
    report = bench_sample.main(["--unet-preset", "tiny", "--vae-preset", "tiny", "--device", "cpu",
                                "--batch", "1,2", "--steps", "1,2", "--repeats", "1"])
    cells = {(r["model"], r["batch"], r["steps"]) for r in report["rows"]}
    assert cells == {(m, b, s) for m in ("ours", "diffusers") for b in (1, 2) for s in (1, 2)}
    assert all(r["ms"] > 0 for r in report["rows"])
    assert "| 2 | 2 |" in capsys.readouterr().out


def test_bench_unet_and_bench_vae_run_at_smoke_sizes():
    pytest.importorskip("diffusers")
    unet = bench_unet.main(["--preset", "tiny", "--batch", "2", "--steps", "1", "--warmup", "0",
                            "--latent-size", "8", "--device", "cpu"])
    assert [r["model"] for r in unet["results"]] == ["ours", "diffusers"]
    vae = bench_vae.main(["--size", "32", "--batch", "2", "--steps", "1", "--warmup", "0", "--channels", "32",
                          "--channel-mult", "1,2", "--device", "cpu", "--dtype", "fp32"])
    assert set(vae["results"]) == {"ours", "diffusers"}
    assert vae["max_abs_output_difference"] < 1e-4     # the compared VAEs are the same function


def test_bench_unet_times_a_dit_against_diffusers_dit_of_the_same_size():
    """Same width, depth, heads and patch: diffusers' DiT holds exactly the parameters of ours plus one
    more copy of the time and class embedders per block after the first."""
    pytest.importorskip("diffusers")
    report = bench_unet.main(["--preset", "dit-tiny", "--batch", "2", "--steps", "1", "--warmup", "0",
                              "--latent-size", "8", "--device", "cpu"])
    ours, theirs = report["results"]
    assert (ours["model"], theirs["model"]) == ("ours", "diffusers")
    d, depth = 64, 2                                              # configs/unet/dit-tiny.json
    embedder = (256 * d + d) + (d * d + d) + (bench_unet.NUM_CLASSES + 1) * d
    assert theirs["params"] == ours["params"] + (depth - 1) * embedder


def test_bench_objectives_times_every_quality_variant_with_its_switches():
    """Each variant's step is the one its name says: the switches of quality.VARIANTS are on in its config
    and network (guidance input, interval input, OT pool), and every round is timed."""
    import bench_objectives
    report = bench_objectives.main(["--preset", "micro", "--rounds", "2", "--steps", "1"])
    assert set(report["seconds_per_step"]) == set(bench_objectives.quality.VARIANTS)
    assert all(len(times) == 2 and min(times) > 0 for times in report["seconds_per_step"].values())
    micro = bench_objectives.quality.PRESETS["micro"]
    all_switches = bench_objectives.Variant("shortcut+all", micro, "unet", torch.device("cpu"))
    assert all_switches.net.guidance_emb is not None and all_switches.pool is not None
    assert all_switches.objective.wavelet_levels == 2
    meanflow = bench_objectives.Variant("meanflow", micro, "unet", torch.device("cpu"))
    assert meanflow.cfg.model.step_input == "interval" and meanflow.net.guidance_emb is None
