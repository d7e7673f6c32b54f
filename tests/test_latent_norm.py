"""Stage 2's latent normalisation: the VAE's own (scale, shift, per-channel statistics in its config) or the run's
``latent_norm.mode=channel`` (statistics given, or measured exactly over the latent store), recorded in the
export and applied by sample.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from modules.config.io import load_config
from modules.config.schema import ConfigError, UNetRunConfig
from modules.core.seeding import image_seed, initial_noise
from modules.data.image_io import to_uint8
from modules.data.latent_store import LatentStore
from modules.interop.vae import load_vae
from modules.run.export import latent_norm_record, latent_statistics, load_network, read_network_export
from test_train_unet import train
from train_unet import main as train_unet_main


class Rows:
    """A latent store's row interface over given posterior means and stds."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.mean)

    def __getitems__(self, rows):
        return {"mean": self.mean[rows], "std": self.std[rows]}


def test_measured_statistics_are_those_of_the_posterior_samples():
    """Law of total variance, computed another way: Var z = Var(mean) + E[std^2] per channel; and a large
    Monte-Carlo draw agrees."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(600, 3, 4, 4, generator=gen) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1) + \
        torch.tensor([2.0, -1.0, 0.0]).view(1, 3, 1, 1)
    std = torch.rand(600, 3, 4, 4, generator=gen) + 0.1
    centre, spread = latent_statistics(Rows(mean, std), num_rows=600)
    flat_mean = mean.double().transpose(0, 1).reshape(3, -1)
    expected_var = flat_mean.var(dim=1, unbiased=False) + std.double().square().transpose(0, 1).reshape(3, -1).mean(1)
    assert np.allclose(centre, flat_mean.mean(1).numpy(), atol=1e-12)
    assert np.allclose(spread, expected_var.sqrt().numpy(), atol=1e-12)
    draws = (mean + std * torch.randn(mean.shape, generator=gen)).transpose(0, 1).reshape(3, -1)
    assert np.allclose(spread, draws.std(dim=1).numpy(), rtol=0.05)
    # rows spread over the store: a subset whose statistics are the subset's
    centre_few, _ = latent_statistics(Rows(mean, std), num_rows=3)
    assert np.allclose(centre_few, mean[[0, 300, 599]].double().mean(dim=(0, 2, 3)).numpy(), atol=1e-12)


def test_given_statistics_and_their_refusals():
    vae = type("V", (), {"config": type("C", (), {"latent_channels": 4})()})()
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["latent_norm.mode=channel", "latent_norm.scale=0.5",
                                                     "latent_norm.mean=0.86488,-0.27787,0.21617,0.37384",
                                                     "latent_norm.std=4.85504,5.31922,3.93725,3.98700"])
    record = latent_norm_record(cfg.latent_norm, vae, None)
    assert record == {"scale_factor": 0.5, "shift_factor": 0.0, "latents_mean": [0.86488, -0.27787, 0.21617, 0.37384],
                      "latents_std": [4.85504, 5.31922, 3.93725, 3.98700]}
    assert latent_norm_record(load_config(UNetRunConfig, "unet", "tiny", []).latent_norm, vae, None) is None
    three = load_config(UNetRunConfig, "unet", "tiny", ["latent_norm.mode=channel", "latent_norm.mean=0,0,0",
                                                       "latent_norm.std=1,1,1"])
    with pytest.raises(ConfigError, match="'latent_norm.mean': 3 values for the VAE's 4 latent channels"):
        latent_norm_record(three.latent_norm, vae, None)
    for overrides, message in ((["latent_norm.mode=channel", "latent_norm.mean=0,0,0,0"], "latent_norm.std'"),
                               (["latent_norm.scale=0.5"], "latent_norm.mode': is 'vae'"),
                               (["latent_norm.mode=channel", "latent_norm.mean=0,0,0,0", "latent_norm.std=1,1,1,0"],
                                "latent_norm.std': must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(UNetRunConfig, "unet", "tiny", overrides)


def test_a_run_normalised_per_channel_records_it_and_sample_py_decodes_with_it(shapes_dir, tiny_vae_run, tmp_path):
    out = tmp_path / "run"
    train(shapes_dir, tiny_vae_run, out, "--max-steps", "2", "cond.type=class", "latent_norm.mode=channel",
          "train.checkpoint_every=2", "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}")
    export = read_network_export(out / "unet_ema")
    store = LatentStore(next((tmp_path / "cache").glob("store_*")), hflip=False)
    mean, std = latent_statistics(store, 10_000)
    assert export.vae["latent_norm"] == {"scale_factor": 1.0, "shift_factor": 0.0, "latents_mean": mean,
                                         "latents_std": std}
    # the run's copy of its VAE is the VAE as given (its identity is the one recorded)
    frozen = json.loads((out / "frozen_vae" / "config.json").read_text())["model"]
    assert frozen["latents_mean"] == [] and frozen["scale_factor"] == load_vae(tiny_vae_run).config.scale_factor
    sample.main(["--unet", str(out), "--out", str(tmp_path / "s"), "--num-samples", "3", "--steps", "1",
                 "--seed", "7"])
    model, vae = load_network(out / "unet_ema"), load_vae(out / "frozen_vae")
    x = initial_noise([image_seed(7, i) for i in range(3)], (4, 16, 16))
    with torch.no_grad():
        x = x + model(x, torch.zeros(3), level=torch.zeros(3, dtype=torch.long), cond=torch.arange(3))
        z = x * torch.tensor(std).view(1, 4, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1)
        expected = to_uint8(vae.decode(z).clamp(-1, 1))
    for i in range(3):
        made = np.asarray(Image.open(tmp_path / "s" / f"{i:06d}.png"), dtype=np.int16)
        assert np.abs(made - expected[i]).max() <= 1, i


def test_a_resume_with_another_latent_norm_is_refused(tmp_path):
    import train_unet
    from modules.errors import CheckpointError
    from modules.run.checkpoint import RunIdentity
    before = load_config(UNetRunConfig, "unet", "tiny", [])
    after = load_config(UNetRunConfig, "unet", "tiny", ["latent_norm.mode=channel"])
    saved = RunIdentity("train_unet", before, train_unet.MODEL_SECTIONS).record()
    RunIdentity("train_unet", before, train_unet.MODEL_SECTIONS).check(saved, tmp_path)
    with pytest.raises(CheckpointError, match="latent_norm.mode: 'vae' != 'channel'"):
        RunIdentity("train_unet", after, train_unet.MODEL_SECTIONS).check(saved, tmp_path)


def test_a_sixteen_channel_shifted_vae_trains_stage_2_and_a_four_channel_store_is_refused(shapes_dir, tiny_vae_run,
                                                                                           tmp_path, capsys):
    """An SD3/FLUX-shaped VAE (16 channels, a shift, no quant convs) gives a 16-channel network whose samples
    decode through the shift; a latent store encoded with a 4-channel VAE is refused for it in one line."""
    import dataclasses

    import encode
    from modules.config.cli import run_cli
    from modules.core.networks.vae import AutoencoderKL
    from modules.run.export import save_vae
    four = load_vae(tiny_vae_run)
    torch.manual_seed(0)
    sixteen = AutoencoderKL(dataclasses.replace(four.config, latent_channels=16, shift_factor=0.1, scale_factor=0.5,
                                                use_quant_conv=False, use_post_quant_conv=False))
    save_vae(sixteen, tmp_path / "vae16")
    out = tmp_path / "run"
    train(shapes_dir, tmp_path / "vae16", out, "--max-steps", "1", "cond.type=class", "train.checkpoint_every=1",
          "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}")
    export = read_network_export(out / "unet_ema")
    assert export.sizes.latent_channels == 16 and export.vae["model"]["shift_factor"] == 0.1
    sample.main(["--unet", str(out), "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "1", "--seed", "7"])
    model, vae = load_network(out / "unet_ema"), load_vae(out / "frozen_vae")
    x = initial_noise([image_seed(7, i) for i in range(2)], (16, 16, 16))
    with torch.no_grad():
        x = x + model(x, torch.zeros(2), level=torch.zeros(2, dtype=torch.long), cond=torch.arange(2))
        expected = to_uint8(vae.decode(x / 0.5 + 0.1).clamp(-1, 1))
    for i in range(2):
        made = np.asarray(Image.open(tmp_path / "s" / f"{i:06d}.png"), dtype=np.int16)
        assert np.abs(made - expected[i]).max() <= 1, i
    encode.main(["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--out",
                 str(tmp_path / "store"), "cond.type=class"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_unet_main, ["--config", "tiny", "--data", str(tmp_path / "store"), "--vae", str(tmp_path / "vae16"),
                                  "--output-dir", str(tmp_path / "run2"), "--report-to", "none", "cond.type=class"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "it was made from other inputs (changed: vae)" in err
    assert "Traceback" not in err
