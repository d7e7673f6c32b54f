"""Stage 2 end to end: train_unet.py on a tiny VAE; resume, cache, objectives, conditioning, DDP."""
import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train_unet
from modules.core.generation import GenerationSpec, generate_latents
from modules.data.latent_store import LatentStore
from modules.run import harness
from modules.run.export import load_network, read_network_export, read_weights

ROOT = Path(__file__).resolve().parent.parent


def train(data, vae, out, *extra):
    train_unet.main(["--config", "tiny", "--data", str(data), "--vae", str(vae), "--output-dir", str(out),
                     "--report-to", "none", *extra])


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=key)


def test_resume_continues_exactly_with_emas(shapes_dir, tiny_vae_run, tmp_path):
    common = ["cond.type=class", "train.checkpoint_every=4", "train.image_log_every=100", "train.log_every=2"]
    train(shapes_dir, tiny_vae_run, tmp_path / "straight", "--max-steps", "8", *common)
    train(shapes_dir, tiny_vae_run, tmp_path / "split", "--max-steps", "4", *common)
    train(shapes_dir, tiny_vae_run, tmp_path / "split", "--max-steps", "8", "--resume", "latest", *common)
    for folder in ("unet", "unet_ema"):
        assert_same_weights(tmp_path / "straight" / folder, tmp_path / "split" / folder)
    # Both EMAs (sampling and teacher) are in the checkpoint and continued exactly.
    assert_same_weights(tmp_path / "straight" / "checkpoints" / "step_8" / "ema_rank0.safetensors",
                        tmp_path / "split" / "checkpoints" / "step_8" / "ema_rank0.safetensors")
    emas = read_weights(tmp_path / "straight" / "checkpoints" / "step_8" / "ema_rank0.safetensors")
    assert any(k.startswith("teacher.") for k in emas) and any(k.startswith("sample.") for k in emas)
    # The exported EMA is not the online model.
    online, ema = read_weights(tmp_path / "straight" / "unet"), read_weights(tmp_path / "straight" / "unet_ema")
    assert any(not torch.equal(online[k], ema[k]) for k in online)


def test_export_records_vae_and_config(tiny_unet_run, tiny_vae_run):
    config = json.loads((tiny_unet_run / "unet_ema" / "config.json").read_text())
    assert config["kind"] == "unet" and config["objective"] == "shortcut"
    assert Path(config["vae"]["path"]) == (tiny_vae_run / "vae").resolve()
    assert config["vae"]["model"]["latent_channels"] == 4 and config["vae"]["model"]["scale_factor"] != 1.0
    assert config["sizes"]["num_classes"] == 3 and config["sizes"]["inputs"]["levels"] == 4  # log2(8) + 1
    assert config["run_config"] == json.loads((tiny_unet_run / "config.json").read_text())


def test_latent_store_reused_and_rebuilt(shapes_dir, tiny_vae_run, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cache = f"cache_dir={tmp_path / 'cache'}"
    args = ["--max-steps", "1", "train.checkpoint_every=1", "train.image_log_every=100", cache]
    train(shapes_dir, tiny_vae_run, tmp_path / "a", *args)
    assert "encoding latent store" in caplog.text
    (first_store,) = (tmp_path / "cache").glob("store_*")
    caplog.clear()
    train(shapes_dir, tiny_vae_run, tmp_path / "b", *args)
    assert "using latent store" in caplog.text and "encoding" not in caplog.text
    caplog.clear()
    train(shapes_dir, tiny_vae_run, tmp_path / "c", *args, "data.image_size=16")
    assert "encoding latent store" in caplog.text and "differs in: image_size" in caplog.text
    caplog.clear()
    # Another VAE (same architecture, different weights) must not reuse the latents.
    other_vae = tmp_path / "other_vae"
    other_vae.mkdir()
    weights = read_weights(tiny_vae_run / "vae")
    from safetensors.torch import save_file
    save_file({k: v + 0.01 for k, v in weights.items()}, other_vae / "model.safetensors")
    other_config = json.loads((tiny_vae_run / "vae" / "config.json").read_text())
    other_config.pop("digest")       # hand-made weights: no recorded digest to check them against
    (other_vae / "config.json").write_text(json.dumps(other_config))
    train(shapes_dir, other_vae, tmp_path / "d", *args)
    assert "encoding latent store" in caplog.text
    assert len(list((tmp_path / "cache").glob("store_*"))) == 3  # one per (VAE, data, size) key
    # A store whose encode never finished (no index.json) is encoded again (its complete shards kept), not used.
    caplog.clear()
    (first_store / "index.json").unlink()
    train(shapes_dir, tiny_vae_run, tmp_path / "e", *args)
    assert "incomplete store" in caplog.text
    # The store holds the posterior (mean and std) of each image and of its flip.
    latents = LatentStore(first_store, hflip=True)
    item = latents[(0, 1)]
    assert item["mean"].shape == (4, 16, 16) and (item["std"] > 0).all()


def test_a_missing_store_says_whether_the_data_changed(tmp_path):
    """m5: with a store of the same VAE and settings for other data next to it, the reason for
    encoding is that the data changed, not "no store yet"."""
    from modules.data.latent_store import StoreSpec, _nearest_other_store, write_index
    spec = StoreSpec(vae="v" * 64, source="d" * 64, image_size=32, hflip=True, masks=False, text=None, num_rows=24)
    assert "none for images of fingerprint dddddddddddd" in _nearest_other_store(tmp_path, spec)
    for other in (StoreSpec(**{**spec.__dict__, "source": "e" * 64}),
                  StoreSpec(**{**spec.__dict__, "source": "f" * 64, "image_size": 16})):
        (tmp_path / other.name()).mkdir()
        write_index(tmp_path / other.name(), other, 0)
    (tmp_path / "store_damaged").mkdir()
    (tmp_path / "store_damaged" / "index.json").write_text("[1, 2")
    old = StoreSpec(**{**spec.__dict__, "source": "e" * 64}).name()
    problem = _nearest_other_store(tmp_path, spec)
    assert problem.startswith(f"none for these images yet: their fingerprint dddddddddddd differs from eeeeeeeeeeee "
                              f"of store {old}") and "the data changed" in problem, problem
    flipless = StoreSpec(**{**spec.__dict__, "hflip": False})
    assert "differs in: hflip, source" in _nearest_other_store(tmp_path, flipless)


@pytest.mark.parametrize("objective", ["flow", "ddpm"])
def test_baseline_objectives_train_and_export(objective, shapes_dir, tiny_vae_run, tmp_path):
    train(shapes_dir, tiny_vae_run, tmp_path / objective, "--max-steps", "3", f"objective={objective}",
          "train.checkpoint_every=3", "train.image_log_every=3")
    config = json.loads((tmp_path / objective / "unet_ema" / "config.json").read_text())
    assert config["objective"] == objective and config["sizes"]["inputs"]["levels"] == 0
    assert list((tmp_path / objective / "images").glob("*.png"))


def test_mask_conditioning_trains(shapes_dir, tiny_vae_run, tmp_path):
    train(shapes_dir, tiny_vae_run, tmp_path / "mask", "--max-steps", "2", "cond.type=mask", "cond.mask_mode=both",
          "train.checkpoint_every=2", "train.image_log_every=2")
    assert load_network(tmp_path / "mask" / "unet_ema") is not None
    assert read_network_export(tmp_path / "mask" / "unet_ema").config.cond.type == "mask"


def test_class_conditional_model_separates_two_classes(tmp_path, tiny_vae_run):
    """Two classes of flat colour (red vs blue): samples of each class must land nearer to that
    class's mean latent than to the other's, for at least 90% of samples."""
    rng = np.random.default_rng(0)
    for name, colour in [("blue", (40, 60, 220)), ("red", (220, 50, 40))]:
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(16):
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    out = tmp_path / "run"
    train(tmp_path / "data", tiny_vae_run, out, "--max-steps", "150", "cond.type=class", "ema.decay=0.9",
          "train.checkpoint_every=1000", "train.image_log_every=1000", "train.log_every=50",
          f"cache_dir={tmp_path / 'cache'}")
    unet = load_network(out / "unet_ema")
    config = json.loads((out / "unet_ema" / "config.json").read_text())
    export = read_network_export(out / "unet_ema")
    spec = GenerationSpec.of(export.config, export.sizes)
    scale = config["vae"]["model"]["scale_factor"]
    cached = LatentStore(next((tmp_path / "cache").glob("store_*")), hflip=False)
    labels = torch.stack([cached[i]["label"] for i in range(len(cached))])
    means = torch.stack([cached[i]["mean"] for i in range(len(cached))]) * scale
    class_means = torch.stack([means[labels == c].mean(0) for c in (0, 1)])
    n = 16
    cond = torch.tensor([0] * n + [1] * n)
    z = generate_latents(unet, spec, cond, range(2 * n), steps=8)
    distance = ((z[:, None] - class_means[None]) ** 2).flatten(2).mean(-1)
    accuracy = (distance.argmin(1) == cond).float().mean().item()
    assert accuracy >= 0.9, accuracy


def launch_two_processes(shapes_dir, tiny_vae_run, tmp_path, out, *extra) -> str:
    """``train_unet.py`` under ``accelerate launch`` with two CPU processes; its log."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml",
         "train_unet.py", "--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run),
         "--output-dir", str(out), "--report-to", "none", "cond.type=class", "train.batch_size=4",
         "train.checkpoint_every=2", "train.image_log_every=4", f"cache_dir={tmp_path / 'cache'}", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_two_process_meanflow(shapes_dir, tiny_vae_run, tmp_path):
    """MeanFlow's JVP goes through DDP's forward, whose bucket rebuild at step 2 once failed inside
    torch.func.jvp."""
    log = launch_two_processes(shapes_dir, tiny_vae_run, tmp_path, tmp_path / "ddp", "--max-steps", "4",
                               "objective=meanflow")
    assert "EMA weights identical on all 2 processes" in log
    assert (tmp_path / "ddp" / "unet_ema" / "model.safetensors").is_file()


def test_two_process_run_resumed_by_two_processes_equals_a_straight_one(shapes_dir, tiny_vae_run, tmp_path):
    """Two CPU processes train with DDP and keep identical EMAs; stopped and resumed by two processes, the
    run ends with the straight run's weights. (A two-process resume once failed to read the EMAs onto the
    device "cpu:0".)"""
    log = launch_two_processes(shapes_dir, tiny_vae_run, tmp_path, tmp_path / "straight", "--max-steps", "4")
    assert "2 process(es), distributed type MULTI_CPU" in log
    assert "EMA weights identical on all 2 processes" in log
    launch_two_processes(shapes_dir, tiny_vae_run, tmp_path, tmp_path / "split", "--max-steps", "2")
    log = launch_two_processes(shapes_dir, tiny_vae_run, tmp_path, tmp_path / "split", "--max-steps", "4",
                               "--resume", "latest")
    assert "EMA weights identical on all 2 processes" in log
    for folder in ("unet", "unet_ema"):
        assert_same_weights(tmp_path / "straight" / folder, tmp_path / "split" / folder)


def test_resume_with_another_model_config_names_the_fields(shapes_dir, tiny_vae_run, tmp_path, capsys):
    train(shapes_dir, tiny_vae_run, tmp_path / "run", "--max-steps", "1", "train.checkpoint_every=1",
          "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}")
    from modules.config.cli import run_cli
    with pytest.raises(SystemExit):
        run_cli(train_unet.main, ["--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run),
                                  "--output-dir", str(tmp_path / "run"), "--report-to", "none", "--resume", "latest",
                                  "--max-steps", "2", "model.base_channels=16", f"cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert "another model config" in err and "model.base_channels: 32 != 16" in err


def test_memory_switches_train_the_same_weights(shapes_dir, tiny_vae_run, tmp_path):
    """train.gradient_checkpointing and train.channels_last change memory, not the result."""
    common = ["--max-steps", "2", "cond.type=class", "train.checkpoint_every=2", "train.image_log_every=100",
              f"cache_dir={tmp_path / 'cache'}"]
    train(shapes_dir, tiny_vae_run, tmp_path / "plain", *common)
    train(shapes_dir, tiny_vae_run, tmp_path / "switched", *common, "train.gradient_checkpointing=true",
          "train.channels_last=true")
    assert_same_weights(tmp_path / "plain" / "unet", tmp_path / "switched" / "unet", atol=1e-5)


def test_held_out_latents_never_reach_a_training_batch(shapes_dir, tiny_vae_run, tiny_unet_run, tmp_path, monkeypatch):
    """eval.val_images: the validation loss is computed on latents that training never draws."""
    trained, held_out = [], []
    real_loader, real_evaluator = train_unet.make_loader, train_unet.TrainingEvaluator

    def recording_loader(*args, **kwargs):
        for batch in real_loader(*args, **kwargs):
            trained.extend(batch["index"].tolist())
            yield batch

    class RecordingEvaluator(real_evaluator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            held_out.extend(int(self.val_set[i]["index"]) for i in range(len(self.val_set)))

    monkeypatch.setattr(train_unet, "make_loader", recording_loader)
    monkeypatch.setattr(train_unet, "TrainingEvaluator", RecordingEvaluator)
    train(shapes_dir, tiny_vae_run, tmp_path / "run", "--max-steps", "8", "cond.type=class", "eval.every=4",
          "eval.val_images=4", "train.image_log_every=100", f"cache_dir={tiny_unet_run.parent / 'latent_cache'}")
    assert len(set(held_out)) == 4
    assert not set(trained) & set(held_out), sorted(set(trained) & set(held_out))
    assert set(trained) | set(held_out) == set(range(24))       # every other latent is trained on



HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")


def host_reads_by_step(monkeypatch, run) -> dict[int, list[str]]:
    """Every read of a tensor's value on the host during the training loop of ``run()``, by the
    step counter at that moment: ``{step: [read, ...]}``, a read named ``what file:line``.

    On CPU nothing synchronises, so the reads themselves are counted: every way a value reaches
    Python (``item``, ``tolist``, ``cpu``, ``bool``, ``float``, ``int``, numpy). The data
    pipeline's own tensors (the read order, the loader's batches) live on the host on a GPU too
    and are left out."""
    states, reads = [], {}

    class RecordedState(harness.TrainingState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            states.append(self)

    def set_lr(*args, real=train_unet.set_lr):   # the first thing of every step: the loop has started
        states[0].in_loop = True
        return real(*args)

    def recorded(name, original):
        def read(self, *args, **kwargs):
            if states and getattr(states[0], "in_loop", False):
                frames = traceback.extract_stack()[:-1]
                if not any("/torch/utils/data/" in f.filename or f.filename.endswith("modules/data/order.py")
                           for f in frames):
                    ours = [f for f in frames if str(ROOT) in f.filename and "/tests/" not in f.filename]
                    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
                    reads.setdefault(states[0].step, []).append(f"{name} {where}")
            return original(self, *args, **kwargs)
        return read

    monkeypatch.setattr(harness, "TrainingState", RecordedState)
    monkeypatch.setattr(train_unet, "set_lr", set_lr)
    with monkeypatch.context() as patched:
        for name in HOST_READS:
            patched.setattr(torch.Tensor, name, recorded(name, getattr(torch.Tensor, name)))
        run()
    return reads


def test_the_training_loop_reads_nothing_from_the_device_between_logging_steps(shapes_dir, tiny_vae_run, tmp_path,
                                                                             monkeypatch):
    """No host synchronisation in the hot loop: with the fused optimizer a bad step is skipped and
    counted on the device, and values reach the host only at logging and checkpoint steps. The
    same probe sees the non-fused optimizer's host check in every step."""
    steps = 4
    common = ["--max-steps", str(steps), "cond.type=class", f"cache_dir={tmp_path / 'cache'}",
              f"train.log_every={steps}", f"train.checkpoint_every={steps}", f"train.image_log_every={steps}"]
    fused = host_reads_by_step(monkeypatch, lambda: train(shapes_dir, tiny_vae_run, tmp_path / "fused", *common))
    assert set(fused) == {steps}, {s: r for s, r in fused.items() if s != steps}   # the last step logs
    host_checked = host_reads_by_step(monkeypatch, lambda: train(shapes_dir, tiny_vae_run, tmp_path / "plain",
                                                                 *common, "train.fused_optimizer=false"))
    assert all(any(r.startswith("__bool__ harness.py:") for r in host_checked.get(s, [])) for s in range(steps))


@pytest.mark.parametrize("preset", ["tiny", "dit-tiny"])
def test_meanflow_trains_resumes_exports_and_samples(preset, shapes_dir, tiny_vae_run, tmp_path):
    """objective=meanflow through train_unet.py (UNet and DiT, guidance folded in): a run resumed at step 2
    equals a straight one; the export records the interval input; sample.py's images at 1 and 2 steps
    are those of the exported model's steps written out: x0 + u(x0, 0, h = 1), and two half steps."""
    import sample
    from modules.core.seeding import image_seed, initial_noise
    from modules.data.image_io import to_uint8
    from modules.interop.vae import load_vae

    def run(out, *extra):
        train_unet.main(["--config", preset, "--data", str(shapes_dir), "--vae", str(tiny_vae_run), "--output-dir",
                         str(out), "--report-to", "none", "objective=meanflow", "cond.type=class", "meanflow.omega=1.5",
                         "train.checkpoint_every=2", "train.image_log_every=100", "sample.steps=1,2",
                         f"cache_dir={tmp_path / 'cache'}", *extra])
    run(tmp_path / "straight", "--max-steps", "4")
    run(tmp_path / "split", "--max-steps", "2")
    run(tmp_path / "split", "--max-steps", "4", "--resume", "latest")
    for folder in ("unet", "unet_ema"):
        assert_same_weights(tmp_path / "straight" / folder, tmp_path / "split" / folder)
    export = read_network_export(tmp_path / "straight" / "unet_ema")
    assert export.config.objective == "meanflow" and export.sizes.inputs.step == "interval"
    assert export.sizes.inputs.levels == 0

    images = {}
    for steps in (1, 2):
        sample.main(["--unet", str(tmp_path / "straight"), "--out", str(tmp_path / f"s{steps}"), "--num-samples", "3",
                     "--steps", str(steps), "--device", "cpu"])
        images[steps] = np.stack([np.asarray(Image.open(tmp_path / f"s{steps}" / f"{i:06d}.png")) for i in range(3)])
        manifest = [json.loads(line) for line in (tmp_path / f"s{steps}" / "manifest.jsonl").read_text().splitlines()]
        assert [m["sampler"] for m in manifest] == ["meanflow"] * 3
    unet = load_network(tmp_path / "straight" / "unet_ema").eval()
    vae = load_vae(tmp_path / "straight" / "frozen_vae").eval()
    noise, labels = initial_noise([image_seed(0, i) for i in range(3)], (4, 16, 16)), torch.arange(3)
    with torch.no_grad():
        one = noise + unet(noise, torch.zeros(3), interval=torch.ones(3), cond=labels)
        half = noise + 0.5 * unet(noise, torch.zeros(3), interval=torch.full((3,), 0.5), cond=labels)
        two = half + 0.5 * unet(half, torch.full((3,), 0.5), interval=torch.full((3,), 0.5), cond=labels)
        for steps, z in ((1, one), (2, two)):
            expected = to_uint8(vae.decode(z / vae.config.scale_factor).clamp(-1, 1))
            assert np.abs(images[steps].astype(int) - expected.astype(int)).max() <= 1, steps


def test_intrinsic_guidance_model_takes_the_cfg_scale_as_an_input(shapes_dir, tiny_vae_run, tmp_path):
    """shortcut.intrinsic_guidance (with the wavelet loss): sample.py --cfg-scale W is one forward with w = W
    (the images of x0 + f(x0, 0, level 0, w = W)); a scale outside the trained range is refused."""
    import sample
    from modules.core.seeding import image_seed, initial_noise
    from modules.data.image_io import to_uint8
    from modules.errors import ConfigError
    from modules.interop.vae import load_vae

    train(shapes_dir, tiny_vae_run, tmp_path / "run", "--max-steps", "3", "cond.type=class",
          "shortcut.intrinsic_guidance=true", "shortcut.wavelet_levels=2", "train.checkpoint_every=3",
          "train.image_log_every=100", f"cache_dir={tmp_path / 'cache'}")
    sample.main(["--unet", str(tmp_path / "run"), "--out", str(tmp_path / "s"), "--num-samples", "2", "--steps", "1",
                 "--cfg-scale", "2.5", "--device", "cpu"])
    unet = load_network(tmp_path / "run" / "unet_ema").eval()
    vae = load_vae(tmp_path / "run" / "frozen_vae").eval()
    noise = initial_noise([image_seed(0, i) for i in range(2)], (4, 16, 16))
    with torch.no_grad():
        z = noise + unet(noise, torch.zeros(2), level=torch.zeros(2, dtype=torch.long), cond=torch.arange(2),
                         guidance=torch.full((2,), 2.5))
        expected = to_uint8(vae.decode(z / vae.config.scale_factor).clamp(-1, 1))
    got = np.stack([np.asarray(Image.open(tmp_path / "s" / f"{i:06d}.png")) for i in range(2)])
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(ConfigError, match="--cfg-scale 5.0: guidance scale 5.0: this model takes the scale as an"):
        sample.main(["--unet", str(tmp_path / "run"), "--out", str(tmp_path / "s5"), "--steps", "1",
                     "--cfg-scale", "5"])


def test_meanflow_trains_under_bf16_mixed_precision(shapes_dir, tiny_vae_run, tmp_path):
    """Accelerate puts bf16 autocast inside the network's forward, so the JVP runs under it: through the
    UNet's GroupNorm this used to stop the run ("Input type (torch.FloatTensor) and weight type
    (CPUBFloat16Type) should be the same"); now it trains and exports finite weights. (A subprocess:
    Accelerate's precision is fixed once per process.)"""
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train_unet.py", "--config", "tiny", "--data", str(shapes_dir), "--vae", str(tiny_vae_run),
         "--output-dir", str(tmp_path / "bf16"), "--report-to", "none", "--max-steps", "2", "objective=meanflow",
         "cond.type=class", "train.mixed_precision=bf16", "train.checkpoint_every=2", "train.image_log_every=100",
         f"cache_dir={tmp_path / 'cache'}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mixed precision bf16" in result.stderr
    weights = read_weights(tmp_path / "bf16" / "unet")
    assert all(torch.isfinite(w).all() for w in weights.values())
