"""Post-hoc EMA (EDM2): the power-function EMA and its profile math against EDM2's own formulas, the
reconstruction against EMAs tracked directly at the reconstructed length, and the snapshots of a
training run (resume, damage, export, sample.py, evaluate.py sweep)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import scipy.integrate
import torch
from safetensors.torch import load_file
from torch import nn

import posthoc_ema
import train_unet
from modules.config.cli import run_cli
from modules.core.posthoc_ema import (SIGMA_REL_LIMIT, PowerEMA, gamma_of, profile_products, reconstruction,
                                      sigma_rel_of)
from modules.errors import ConfigError, ModelFolderError
from modules.run import posthoc
from modules.run.export import load_network, read_network_export, read_weights


# ----------------------------------------------------------------------------- EDM2's formulas, transcribed
# NVlabs/edm2, training/phema.py (commit 4bf8162), line by line, in float64.

def edm2_exp_to_std(exp):                                  # phema.py lines 19-22 (eq. 123)
    exp = np.float64(exp)
    return np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))


def edm2_std_to_exp(std):                                  # lines 28-33 (eq. 126, Algorithm 2)
    std = np.float64(std)
    tmp = std.flatten() ** -2
    exp = [np.roots([1, 7, 16 - t, 12 - t]).real.max() for t in tmp]
    return np.float64(exp).reshape(std.shape)


def edm2_power_function_correlation(a_ofs, a_std, b_ofs, b_std):    # lines 56-65 (eq. 151, Algorithm 3)
    a_exp = edm2_std_to_exp(a_std)
    b_exp = edm2_std_to_exp(b_std)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    t_max = np.maximum(a_ofs, b_ofs)
    num = (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp
    den = (a_exp + b_exp + 1) * t_max
    return num / den


def edm2_power_function_beta(std, t_next, t_delta):       # lines 71-73 (eq. 127)
    return (1 - t_delta / t_next) ** (edm2_std_to_exp(std) + 1)


def edm2_solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):   # lines 79-89 (Algorithm 3)
    in_ofs, in_std = np.broadcast_arrays(in_ofs, in_std)
    out_ofs, out_std = np.broadcast_arrays(out_ofs, out_std)
    rv = lambda x: np.float64(x).reshape(-1, 1)   # noqa: E731
    cv = lambda x: np.float64(x).reshape(1, -1)   # noqa: E731
    A = edm2_power_function_correlation(rv(in_ofs), rv(in_std), cv(in_ofs), cv(in_std))
    B = edm2_power_function_correlation(rv(in_ofs), rv(in_std), cv(out_ofs), cv(out_std))
    X = np.linalg.solve(A, B)
    return X / np.sum(X, axis=0)


SIGMA_RELS = [0.01, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.28]


def test_exponent_and_length_match_edm2():
    for s in SIGMA_RELS:
        assert gamma_of(s) == pytest.approx(float(edm2_std_to_exp(s)), rel=1e-12)
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(s, rel=1e-12)
        assert sigma_rel_of(gamma_of(s)) == pytest.approx(float(edm2_exp_to_std(gamma_of(s))), rel=1e-12)
    # EDM2's defaults: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94 (paper, section 3.1)
    assert gamma_of(0.05) == pytest.approx(16.97, abs=0.01) and gamma_of(0.10) == pytest.approx(6.94, abs=0.01)
    assert sigma_rel_of(0.0) == pytest.approx(SIGMA_REL_LIMIT)


def test_profile_products_match_edm2_and_the_integral():
    rng = np.random.default_rng(0)
    t_a, t_b = rng.uniform(1, 10 ** 6, 40), rng.uniform(1, 10 ** 6, 40)
    s_a, s_b = rng.choice(SIGMA_RELS, 40), rng.choice(SIGMA_RELS, 40)
    ours = profile_products(t_a, [gamma_of(s) for s in s_a], t_b, [gamma_of(s) for s in s_b])
    np.testing.assert_allclose(ours, edm2_power_function_correlation(t_a, s_a, t_b, s_b), rtol=1e-10)
    # and both against the integral itself, by quadrature (an independent reference)
    for ta, sa, tb, sb in [(700.0, 0.05, 1000.0, 0.1), (1000.0, 0.2, 300.0, 0.07), (500.0, 0.15, 500.0, 0.15)]:
        ga, gb = gamma_of(sa), gamma_of(sb)
        def profile(tau, t, g):
            return (g + 1) * tau ** g / t ** (g + 1)
        integral, _ = scipy.integrate.quad(lambda tau: profile(tau, ta, ga) * profile(tau, tb, gb), 0, min(ta, tb),
                                           epsabs=0, epsrel=1e-12, limit=200)
        assert profile_products(ta, ga, tb, gb) == pytest.approx(integral, rel=1e-9)


def test_reconstruction_coefficients_match_edm2():
    steps = np.arange(1, 41) * 256.0
    t = np.concatenate([steps, steps])
    sigma_rels = [0.05] * 40 + [0.10] * 40
    wanted = [0.03, 0.05, 0.07, 0.085, 0.12, 0.15, 0.2]
    ours, errors = reconstruction(t, sigma_rels, steps[-1], wanted)
    theirs = edm2_solve_posthoc_coefficients(t, sigma_rels, steps[-1], wanted)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9 * np.abs(theirs).max())
    np.testing.assert_allclose(ours.sum(axis=0), 1.0, rtol=1e-12)
    assert errors[wanted.index(0.05)] < 1e-6          # a tracked length is fitted exactly
    assert (errors < 0.02).all(), errors


def test_power_ema_beta_and_weights_are_edm2s_and_the_profile_on_unit_steps():
    """The tracker's decay is EDM2's eq. 127 with t counted in updates (t_delta = 1), and update k of t
    gets the profile's mass on (k - 1, k]: (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = PowerEMA(model, 0.1)
    g = gamma_of(0.1)
    trajectory = [torch.randn(2, 3, dtype=torch.float64) for _ in range(300)]
    for n, weight in enumerate(trajectory):
        assert ema.current_decay() == pytest.approx(float(edm2_power_function_beta(0.1, n + 1, 1)), abs=1e-15)
        with torch.no_grad():
            model.weight.copy_(weight)
        ema.update(model)
    t = len(trajectory)
    k = np.arange(1, t + 1, dtype=np.float64)
    mass = (k ** (g + 1) - (k - 1) ** (g + 1)) / t ** (g + 1)
    expected = sum(m * w for m, w in zip(mass, trajectory))
    torch.testing.assert_close(ema.shadow["weight"].double(), expected, rtol=0, atol=2e-6)
    assert ema.num_updates == t


def test_power_ema_skips_a_step_flagged_not_finite():
    model = nn.Linear(3, 2)
    ema = PowerEMA(model, 0.05)
    ema.update(model)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, torch.tensor(False))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())


def toy_run(steps: int, every: int, tracked: list[float], direct: list[float], seed: int = 0):
    """A parameter vector trained by noisy gradient steps on a drifting quadratic: snapshots of power EMAs at
    ``tracked`` every ``every`` steps, and power EMAs at ``direct`` tracked all along."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    emas = {s: PowerEMA(model, s) for s in tracked + direct}
    target = torch.randn(64)
    snapshots = []     # (t, sigma_rel, weights)
    for step in range(1, steps + 1):
        target = target + 0.01 * torch.randn(64)
        loss = ((model.weight[0] - target) ** 2).sum() / 2
        optimizer.zero_grad()
        (loss + 0.5 * (torch.randn(64) * model.weight[0]).sum()).backward()
        optimizer.step()
        for ema in emas.values():
            ema.update(model)
        if step % every == 0:
            snapshots += [(step, s, emas[s].shadow["weight"].double().clone()) for s in tracked]
    return snapshots, {s: emas[s].shadow["weight"].double() for s in direct}


def test_a_reconstruction_equals_the_ema_tracked_directly_at_that_length():
    """EDM2's validation on a toy trajectory: from snapshots of sigma_rel 0.05 and 0.10 every 50 of 2000 steps,
    the EMA at 0.04, 0.07, 0.085, 0.12 and 0.15 equals the one tracked directly at that length. Tolerance: the
    error is at most 1 % of the distance from the direct EMA to the nearest tracked one (measured: 0.19 % at
    0.04, outside the tracked pair; 0.027 to 0.031 % inside it and at 0.15), and the fitted profile is within
    1 % of the wanted one in L2 (measured: 0.04 % to 0.18 %)."""
    tracked, direct = [0.05, 0.10], [0.04, 0.07, 0.085, 0.12, 0.15]
    snapshots, directly = toy_run(2000, 50, tracked, direct)
    t, sigma_rels, weights = zip(*snapshots)
    coefficients, errors = reconstruction(t, sigma_rels, 2000, direct)
    final = {s: w for step, s, w in snapshots if step == 2000}
    for j, s in enumerate(direct):
        rebuilt = sum(float(c) * w for c, w in zip(coefficients[:, j], weights))
        nearest = min(tracked, key=lambda x: abs(x - s))
        error, spread = (rebuilt - directly[s]).norm(), (directly[s] - final[nearest]).norm()
        assert error <= 0.01 * spread, (s, float(error), float(spread))
        assert errors[j] < 0.01, (s, errors[j])


def test_a_reconstruction_at_a_tracked_length_is_that_snapshot():
    snapshots, _ = toy_run(1000, 100, [0.05, 0.10], [])
    t, sigma_rels, weights = zip(*snapshots)
    coefficients, _ = reconstruction(t, sigma_rels, 1000, [0.10])
    rebuilt = sum(float(c) * w for c, w in zip(coefficients[:, 0], weights))
    torch.testing.assert_close(rebuilt, weights[-1], rtol=0, atol=1e-9 * float(weights[-1].abs().max()) + 1e-12)


# ----------------------------------------------------------------------------- a training run's snapshots

def train(data, vae, out, cache, *extra):
    train_unet.main(arguments(data, vae, out, cache, *extra))


def arguments(data, vae, out, cache, *extra) -> list[str]:
    return ["--config", "tiny", "--data", str(data), "--vae", str(vae), "--output-dir", str(out), "--report-to", "none",
            "cond.type=class", "train.image_log_every=1000", f"cache_dir={cache}", "ema.posthoc=true", *extra]


@pytest.fixture(scope="module")
def posthoc_run(shapes_dir, tiny_vae_run, tmp_path_factory):
    """A 16-step run with power EMAs at sigma_rel 0.05, 0.07 and 0.10, snapshots at every step."""
    root = tmp_path_factory.mktemp("posthoc")
    train(shapes_dir, tiny_vae_run, root / "run", root / "cache", "--max-steps", "16", "train.checkpoint_every=16",
          "ema.posthoc_every=1", "ema.posthoc_sigma_rels=0.05,0.07,0.1")
    return root / "run"


def copy_run(run, to):
    """The run's snapshots and export (what a reconstruction reads), to damage."""
    for name in ("posthoc_ema", "unet_ema"):
        shutil.copytree(run / name, to / name)
    return to


def test_snapshots_hold_the_power_emas_of_the_checkpoint(posthoc_run):
    index = posthoc.read_index(posthoc_run / "posthoc_ema")
    assert [(s.step, s.t, s.sigma_rel) for s in index] == [(step, step, s) for step in range(1, 17)
                                                           for s in (0.05, 0.07, 0.1)]
    checkpoint = load_file(posthoc_run / "checkpoints" / "step_16" / "ema_rank0.safetensors")
    snapshot = load_file(posthoc_run / "posthoc_ema" / "step_000000016_sigma_0.07.safetensors")
    shadows = {k.removeprefix("posthoc_0.07.shadow."): v for k, v in checkpoint.items()
               if k.startswith("posthoc_0.07.shadow.")}
    assert shadows and all(torch.equal(snapshot[k], v) for k, v in shadows.items())
    assert int(checkpoint["posthoc_0.07.num_updates"]) == 16


def test_a_run_reconstructs_a_length_it_did_not_track_and_sample_py_reads_it(posthoc_run, tmp_path, capsys):
    """The 0.07 snapshots are set aside: the EMA at 0.07 rebuilt from the 0.05 and 0.10 ones (16 of each) equals
    the one the run tracked at 0.07, within 0.1 % of its distance to the nearest tracked EMA (measured: 0.012 %;
    the profile fit is within 0.38 %); a tracked length is rebuilt as its own snapshot (measured: exactly)."""
    run = copy_run(posthoc_run, tmp_path / "run")
    folder = run / "posthoc_ema"
    index = posthoc.read_index(folder)
    posthoc.write_index(folder, [s for s in index if s.sigma_rel != 0.07])
    posthoc_ema.main([str(run), "--sigma-rels", "0.07,0.1", "--out", str(tmp_path / "out")])
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "unet_phema_0.07"),
                                               str(tmp_path / "out" / "unet_phema_0.1")]
    direct = load_file(posthoc_run / "posthoc_ema" / "step_000000016_sigma_0.07.safetensors")
    tracked = load_file(posthoc_run / "posthoc_ema" / "step_000000016_sigma_0.05.safetensors")
    rebuilt = read_weights(tmp_path / "out" / "unet_phema_0.07")
    assert rebuilt.keys() == direct.keys()
    error = torch.cat([(rebuilt[k] - direct[k]).flatten() for k in direct]).norm()
    spread = torch.cat([(tracked[k] - direct[k]).flatten() for k in direct]).norm()
    assert error <= 0.001 * spread, (float(error), float(spread))
    own = read_weights(tmp_path / "out" / "unet_phema_0.1")
    snapshot = load_file(posthoc_run / "posthoc_ema" / "step_000000016_sigma_0.1.safetensors")
    for k in snapshot:
        torch.testing.assert_close(own[k], snapshot[k], rtol=0, atol=1e-6)
    export = read_network_export(tmp_path / "out" / "unet_phema_0.07")
    config = json.loads((tmp_path / "out" / "unet_phema_0.07" / "config.json").read_text())
    assert export.weights == "posthoc_ema" and config["posthoc_ema"]["sigma_rel"] == 0.07
    assert config["posthoc_ema"]["step"] == 16 and len(config["posthoc_ema"]["snapshots"]) == 32
    # Its model card says why it has no diffusers copy as training's export does (the same writer decides).
    card = (tmp_path / "out" / "unet_phema_0.07" / "README.md").read_text()
    assert "No diffusers copy: model.arch=unet" in card
    assert "No diffusers copy: model.arch=unet" in (posthoc_run / "unet_ema" / "README.md").read_text()
    load_network(tmp_path / "out" / "unet_phema_0.07")
    import sample
    sample.main(["--unet", str(tmp_path / "out" / "unet_phema_0.07"), "--out", str(tmp_path / "samples"),
                 "--num-samples", "2", "--steps", "1"])
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2


def test_snapshots_survive_a_resume_bit_identically(shapes_dir, tiny_vae_run, tmp_path, caplog):
    """A run whose step-6 checkpoint never came (killed after its step-6 snapshots, and while writing another)
    resumes from step 4: the snapshots after it are removed and made again, and every snapshot and the power
    EMAs of the last checkpoint are bit-identical to an uninterrupted run's."""
    common = ["train.checkpoint_every=4", "ema.posthoc_every=2"]
    train(shapes_dir, tiny_vae_run, tmp_path / "straight", tmp_path / "cache", "--max-steps", "8", *common)
    split = tmp_path / "split"
    train(shapes_dir, tiny_vae_run, split, tmp_path / "cache", "--max-steps", "6", *common)
    shutil.rmtree(split / "checkpoints" / "step_6")
    (split / "posthoc_ema" / ".step_000000008_sigma_0.05.safetensors.x1.tmp").write_bytes(b"half a snapshot")
    with caplog.at_level("INFO"):
        train(shapes_dir, tiny_vae_run, split, tmp_path / "cache", "--max-steps", "8", "--resume", "latest", *common)
    assert "removed 2 post-hoc EMA snapshot(s) after step 4" in caplog.text
    straight = posthoc.read_index(tmp_path / "straight" / "posthoc_ema")
    assert [(s.step, s.sigma_rel) for s in straight] == [(step, s) for step in (2, 4, 6, 8) for s in (0.05, 0.1)]
    assert posthoc.read_index(split / "posthoc_ema") == straight      # sizes and digests: the same bytes
    assert sorted(p.name for p in (split / "posthoc_ema").iterdir()) == \
        sorted(p.name for p in (tmp_path / "straight" / "posthoc_ema").iterdir())
    emas = [load_file(run / "checkpoints" / "step_8" / "ema_rank0.safetensors")
            for run in (tmp_path / "straight", split)]
    assert any(k.startswith("posthoc_0.05.") for k in emas[0]) and any(k.startswith("posthoc_0.1.") for k in emas[0])
    assert emas[0].keys() == emas[1].keys() and all(torch.equal(emas[0][k], emas[1][k]) for k in emas[0])


def test_a_resume_may_not_turn_posthoc_on_or_change_its_lengths(shapes_dir, tiny_vae_run, tmp_path, capsys):
    train(shapes_dir, tiny_vae_run, tmp_path / "run", tmp_path / "cache", "--max-steps", "1",
          "train.checkpoint_every=1")
    for change, line in (("ema.posthoc=false", "ema.posthoc: True != False"),
                         ("ema.posthoc_sigma_rels=0.05,0.2", "ema.posthoc_sigma_rels")):
        with pytest.raises(SystemExit):
            run_cli(train_unet.main, arguments(shapes_dir, tiny_vae_run, tmp_path / "run", tmp_path / "cache",
                                               "--max-steps", "2", "--resume", "latest", change))
        err = capsys.readouterr().err
        assert "another model config" in err and line in err, err


@pytest.mark.parametrize("override, message", [
    ("ema.posthoc_sigma_rels=0.3", "config key 'ema.posthoc_sigma_rels': must be an EMA length sigma_rel in "
                                   "(0, 0.2887), got 0.3"),
    ("ema.posthoc_sigma_rels=0.05,0.05", "config key 'ema.posthoc_sigma_rels': must be distinct lengths"),
    ("ema.posthoc_every=0", "config key 'ema.posthoc_every': must be > 0"),
])
def test_posthoc_settings_are_checked_where_the_config_is_built(override, message):
    from modules.config.io import load_config
    from modules.config.schema import UNetRunConfig
    with pytest.raises(ConfigError) as e:
        load_config(UNetRunConfig, "unet", "tiny", ["ema.posthoc=true", override])
    assert message in str(e.value)


def damage(path, how):
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:                           # the same size, other bytes: only the digest sees it
        data = bytearray(path.read_bytes())
        data[-50:] = bytes(50)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how, problem", [("missing", "missing file"), ("truncated", "bytes, expected"),
                                          ("changed", "changed since it was written")])
def test_a_missing_or_damaged_snapshot_is_one_line_and_can_be_left_out(posthoc_run, tmp_path, capsys, how, problem):
    run = copy_run(posthoc_run, tmp_path / "run")
    name = "step_000000008_sigma_0.05.safetensors"
    damage(run / "posthoc_ema" / name, how)
    with pytest.raises(SystemExit) as e:
        run_cli(posthoc_ema.main, [str(run), "--sigma-rels", "0.08"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and name in err and problem in err and "--skip-damaged" in err
    assert not (run / "unet_phema_0.08").exists()
    posthoc_ema.main([str(run), "--sigma-rels", "0.08", "--skip-damaged"])
    record = json.loads((run / "unet_phema_0.08" / "config.json").read_text())["posthoc_ema"]
    assert len(record["left_out"]) == 1 and name in record["left_out"][0] and name not in record["snapshots"]


def test_a_damaged_index_is_one_line_and_is_listed_again_from_the_files(posthoc_run, tmp_path, capsys):
    run = copy_run(posthoc_run, tmp_path / "run")
    listed = posthoc.read_index(run / "posthoc_ema")
    (run / "posthoc_ema" / "index.json").write_text('{"snapshots": [{"file": "../../x"}]}')
    with pytest.raises(SystemExit):
        run_cli(posthoc_ema.main, [str(run), "--sigma-rels", "0.08"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.json, entry 0: not a snapshot entry" in err
    posthoc_ema.main([str(run), "--rebuild-index"])
    assert posthoc.read_index(run / "posthoc_ema") == listed
    with pytest.raises(SystemExit):
        run_cli(posthoc_ema.main, [str(run), "--sigma-rels", "0.08", "--step", "99"])
    assert "no snapshot at step 99 (snapshots at 16 steps, 1 to 16)" in capsys.readouterr().err


def test_a_resumed_run_lists_a_damaged_index_again_from_the_files(posthoc_run, tmp_path, caplog):
    """What a run does at start with the snapshot folder: a damaged index is listed again from the files (with a
    warning), snapshots after the step it starts from and unlisted files are removed."""
    from types import SimpleNamespace
    run = copy_run(posthoc_run, tmp_path / "run")
    listed = posthoc.read_index(run / "posthoc_ema")
    (run / "posthoc_ema" / "index.json").write_text("{not json")
    (run / "posthoc_ema" / "stray.bin").write_bytes(b"x")
    tracker = posthoc.SnapshotTracker(SimpleNamespace(posthoc_sigma_rels=(0.05,), posthoc_every=1), nn.Linear(2, 2),
                                      None, run)
    with caplog.at_level("WARNING"):
        kept = tracker._tidy(10)
    assert "listing the snapshots again from their files" in caplog.text
    assert kept == [s for s in listed if s.step <= 10] == posthoc.read_index(run / "posthoc_ema")
    assert sorted(p.name for p in (run / "posthoc_ema").iterdir()) == sorted([s.file for s in kept] + ["index.json"])


def test_evaluate_sweeps_the_ema_length(posthoc_run, shapes_dir, tmp_path):
    """``evaluate.py sweep --ema-lengths``: each length reconstructed into OUT/models, sampled and scored; a row and a
    best-length line per step count; run again, nothing is sampled anew (the reconstructions are byte-identical).
    Lengths out of range and a run without snapshots are refused before anything runs."""
    import hashlib

    import evaluate
    from test_metrics import StandInExtractor
    extractor = tmp_path / "standin.pt"
    torch.jit.script(StandInExtractor().eval()).save(str(extractor))
    common = ["--inception", str(extractor), "--inception-sha256", hashlib.sha256(extractor.read_bytes()).hexdigest(),
              "--image-size", "32", "--workers", "1"]
    reference = tmp_path / "shapes.npz"
    assert evaluate.main(["stats", *common, str(shapes_dir), "--out", str(reference)]) == 0
    out = tmp_path / "sweep"
    sweep = ["sweep", *common, "--unet", str(posthoc_run), "--ref", str(reference), "--steps", "1", "--num-samples",
             "64", "--out", str(out), "--ema-lengths", "0.06,0.12"]
    assert evaluate.main(sweep) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert set(rows) == {"ema_0.06_steps_1_cfg_1", "ema_0.12_steps_1_cfg_1"}
    assert [rows[k]["ema_length"] for k in sorted(rows)] == [0.06, 0.12]
    assert rows["ema_0.06_steps_1_cfg_1"]["fid"] != rows["ema_0.12_steps_1_cfg_1"]["fid"]
    table = (out / "sweep.md").read_text()
    assert "| ema_length | steps | cfg_scale | fid |" in table and "- best EMA length at 1 step(s): sigma_rel" in table
    assert read_network_export(out / "models" / "unet_phema_0.12").weights == "posthoc_ema"
    made = {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")}
    assert evaluate.main(sweep) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "samples").rglob("*.png")} == made
    for lengths, run in (("0.06,0.4", posthoc_run), ("0.1", posthoc_run / "unet_ema")):
        bad = ["sweep", *common, "--unet", str(run), "--ref", str(reference), "--steps", "1", "--num-samples", "64",
               "--out", str(tmp_path / "refused"), "--ema-lengths", lengths]
        assert evaluate.main(bad) == 2 and not (tmp_path / "refused").exists()


def test_a_link_planted_as_the_snapshot_folder_is_never_written_through(tmp_path):
    from types import SimpleNamespace
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious.txt").write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / "posthoc_ema").symlink_to(target, target_is_directory=True)
    tracker = posthoc.SnapshotTracker(SimpleNamespace(posthoc_sigma_rels=(0.05,), posthoc_every=1), nn.Linear(2, 2),
                                      None, run)
    assert tracker._tidy(0) == []
    assert (target / "precious.txt").read_text() == "keep" and sorted(p.name for p in target.iterdir()) == \
        ["precious.txt"]
    assert not (run / "posthoc_ema").is_symlink() and (run / "posthoc_ema" / "index.json").is_file()


def test_a_failed_snapshot_write_is_one_line_and_leaves_no_file(tmp_path, monkeypatch):
    import errno
    from types import SimpleNamespace

    from modules.errors import CheckpointError
    tracker = posthoc.SnapshotTracker(SimpleNamespace(posthoc_sigma_rels=(0.05,), posthoc_every=1), nn.Linear(2, 2),
                                      None, tmp_path)
    tracker._tidy(0)

    def full_disk(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(posthoc, "save_file", full_disk)
    with pytest.raises(CheckpointError) as e:
        tracker._write(3, 3, 0.05, nn.Linear(2, 2).state_dict())
    assert str(e.value) == (f"could not write the post-hoc EMA snapshot {tmp_path / 'posthoc_ema'}/"
                            "step_000000003_sigma_0.05.safetensors (No space left on device); the checkpoints and the "
                            "earlier snapshots are untouched")
    assert sorted(p.name for p in (tmp_path / "posthoc_ema").iterdir()) == ["index.json"] and tracker.snapshots == []
