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
    """Eager only: inductor compiles each model for minutes on a CPU (the compiled path of ours is
    tests/test_sample.py::test_compiled_sampling_gives_the_images_of_eager_sampling)."""
    pytest.importorskip("diffusers")
    report = bench_sample.main(["--unet-preset", "tiny", "--vae-preset", "tiny", "--device", "cpu",
                                "--batch", "1,2", "--steps", "1,2", "--repeats", "1", "--warmup", "1", "--no-compile"])
    cells = {(r["model"], r["mode"], r["batch"], r["steps"]) for r in report["rows"]}
    assert cells == {(m, "eager", b, s) for m in ("ours", "diffusers") for b in (1, 2) for s in (1, 2)}
    assert all(r["ms"] > 0 for r in report["rows"])
    ms = {(r["model"], r["batch"], r["steps"]): r["ms"] for r in report["rows"]}
    for cell in report["ratios"]:
        key = (cell["batch"], cell["steps"])
        assert cell["ours_over_diffusers_eager"] == pytest.approx(ms[("ours", *key)] / ms[("diffusers", *key)])
        assert cell["compiled_over_eager_ours"] is None
    out = capsys.readouterr().out
    assert "| 2 | 2 |" in out and "compiled / eager, ours" in out


def test_bench_unet_and_bench_vae_run_at_smoke_sizes():
    pytest.importorskip("diffusers")
    from modules.core.objectives.shortcut import num_bootstrap
    batch = 4
    unet = bench_unet.main(["--preset", "tiny", "--batch", str(batch), "--steps", "1", "--warmup", "0",
                            "--latent-size", "8", "--device", "cpu", "--gemm-size", "256"])
    assert [r["model"] for r in unet["results"]] == ["ours", "diffusers"]
    ours, ref = unet["results"]
    # The FLOP counts: the compared networks have the same widths, so nearly the same FLOPs ...
    assert ours["tflop_per_step"] == pytest.approx(ref["tflop_per_step"], rel=0.02)
    # ... and a shortcut step costs a flow step plus two no-grad forwards (1/3 of a step each) on
    # its bootstrap rows: 1 + 2/3 * B_b / B (the step-size embedding adds a few FLOPs).
    flow, shortcut = unet["objectives"]
    assert (flow["objective"], shortcut["objective"]) == ("flow", "shortcut")
    bootstrap = num_bootstrap(batch, 0.25, num_levels=3)   # the default fraction; any level count > 0
    assert shortcut["tflop_per_step"] / flow["tflop_per_step"] == pytest.approx(1 + 2 * bootstrap / (3 * batch),
                                                                                rel=0.01)
    assert all(r["ms"] > 0 for r in unet["objectives"]) and unet["matmul_peak_tflop_s"] > 0
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
    and network (guidance input, interval input, OT pool within each class, iMF's in-context DiT with or
    without its velocity head), and every round is timed; with masks, 'all' leaves the OT rows out."""
    import bench_objectives
    from modules.core.networks.icdit import ICDiT
    report = bench_objectives.main(["--preset", "micro", "--cond", "class", "--rounds", "2", "--steps", "1"])
    assert set(report["seconds_per_step"]) == set(bench_objectives.quality.VARIANTS)
    assert all(len(times) == 2 and min(times) > 0 for times in report["seconds_per_step"].values())
    micro, cpu = bench_objectives.quality.PRESETS["micro"], torch.device("cpu")
    all_switches = bench_objectives.Variant("shortcut+all", micro, "unet", cpu, "class")
    assert all_switches.net.guidance_emb is not None and all_switches.pool is not None and all_switches.pool.by_class
    assert all_switches.objective.cfg.wavelet_levels == 2
    meanflow = bench_objectives.Variant("meanflow", micro, "unet", cpu)
    assert meanflow.net.sizes.inputs.step == "interval" and meanflow.net.guidance_emb is None
    for name, head in (("imf", True), ("imf+boundary", False)):
        imf = bench_objectives.Variant(name, micro, "unet", cpu, "class")
        assert isinstance(imf.net, ICDiT) and imf.net.sizes.inputs.velocity_head == head
    masks = bench_objectives.parse_args(["--preset", "micro"])
    assert "shortcut+ot" not in masks.variants and "imf" in masks.variants
    with pytest.raises(SystemExit):
        bench_objectives.parse_args(["--variants", "shortcut+ot"])


def test_bench_eval_times_the_code_before_and_after_issue_22_and_they_agree():
    """Every case runs in its own process and reports a time and a peak; the previous code and today's give the
    same precision/recall and the same statistics (to float64 rounding)."""
    import bench_eval
    report = bench_eval.main(["--pr-sizes", "60", "--fid-sizes", "70", "--width", "16", "--threads", "1"])
    assert {(r["case"], r["n"]) for r in report["rows"]} == {("pr_before", 60), ("pr_after", 60),
                                                             ("fid_before", 70), ("fid_after", 70)}
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in report["rows"])
    assert report["agreement"]["pr_60"] == 0 and report["agreement"]["fid_70"] < 1e-12
