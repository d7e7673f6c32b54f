"""Issue 21's rules for configs and the run harness, one test per finding (A-numbers are the
issue's): numbers bounded where they are parsed (rule 5), checks made at start-up (rule 6), paths in
saved configs resolved against the run (rule 4), output folders written only through the write
module (rule 2), no traceback for what a user can cause (rule 7), and compiled runs' exports."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_unet
import train_vae
from modules.config.cli import run_cli
from modules.config.io import load_config
from modules.config.schema import UNetRunConfig, VAERunConfig
from modules.core.vae_loss import NLayerDiscriminator
from modules.errors import ConfigError, ModelFolderError

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def cli(main, argv, capsys) -> tuple[int, str]:
    """Run a script's main as its command line does: (exit code, stderr)."""
    capsys.readouterr()
    try:
        run_cli(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def vae_args(data, out, *extra) -> list[str]:
    return ["--config", "tiny", "--data", str(data), "--output-dir", str(out), "--report-to", "none",
            "--max-steps", "2", "train.checkpoint_every=1", "train.val_every=1", "train.image_log_every=1",
            "scale_samples=4", *extra]


def unet_args(data, vae, out, *extra) -> list[str]:
    return ["--config", "tiny", "--data", str(data), "--vae", str(vae), "--output-dir", str(out),
            "--report-to", "none", "--max-steps", "2", "cond.type=class", "train.checkpoint_every=1",
            "train.image_log_every=2", *extra]


# ----------------------------------------------------------------------------- rule 5: numbers bounded where parsed

STEP_KEYS = ["train.max_steps", "train.checkpoint_every", "train.log_every", "train.val_every",
             "train.image_log_every", "train.lr_warmup_steps", "train.grad_accum", "train.process_timeout_s",
             "train.max_bad_steps", "train.keep_checkpoints", "data.num_val_images", "eval.every",
             "eval.batch_size", "eval.val_images", "sample.steps", "eval.steps"]


@pytest.mark.parametrize("key", STEP_KEYS)
@pytest.mark.parametrize("value", ["1e11", "1e20"])
def test_a30_every_step_and_size_option_is_bounded_where_it_is_parsed(key, value):
    with pytest.raises(ConfigError, match=f"config key '{key}': must be <= "):
        load_config(UNetRunConfig, "unet", "tiny", [f"{key}={value}"])


def test_a30_max_steps_on_the_command_line_is_one_line(tmp_path, capsys):
    for value in ("1e11", "1e20", "100000000000"):
        code, err = cli(train_vae.main, ["--config", "tiny", "--data", tmp_path, "--output-dir", tmp_path / "o",
                                         "--report-to", "none", "--max-steps", value], capsys)
        one_line_error(code, err, "train.max_steps", "must be <=")
    assert not (tmp_path / "o").exists()
    assert load_config(VAERunConfig, "vae", "tiny", ["train.max_steps=1e6"]).train.max_steps == 10 ** 6


@pytest.mark.parametrize("value", [str(2 ** 64), "1e30", "-1"])
def test_a23_the_seed_is_bounded_where_it_is_parsed(value):
    with pytest.raises(ConfigError, match="config key 'train.seed': must be"):
        load_config(UNetRunConfig, "unet", "tiny", [f"train.seed={value}"])
    assert load_config(UNetRunConfig, "unet", "tiny", [f"train.seed={2 ** 64 - 1}"]).train.seed == 2 ** 64 - 1


# ----------------------------------------------------------------------------- rule 6: checks at start-up

@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5])
def test_a48_the_discriminators_depth_is_checked_against_the_image_size_at_start_up(layers):
    """Accepted exactly when the PatchGAN can run on the images (its own forward check agrees)."""
    smallest = NLayerDiscriminator(3, 8, layers).min_input_size
    for size in (8, 16, 24, 32, 48, 64, 96, 128):
        overrides = [f"loss.disc_layers={layers}", f"data.image_size={size}", "model.channel_mult=1"]
        if size >= smallest:
            load_config(VAERunConfig, "vae", "tiny", overrides)
            NLayerDiscriminator(3, 8, layers)(torch.zeros(1, 3, size, size))
        else:
            with pytest.raises(ConfigError, match=f"config key 'loss.disc_layers': {layers} .*{smallest}"):
                load_config(VAERunConfig, "vae", "tiny", overrides)


def test_a48_a_too_deep_discriminator_stops_the_run_before_any_data_is_read(tmp_path, capsys):
    code, err = cli(train_vae.main, vae_args(tmp_path / "no_data", tmp_path / "o", "loss.disc_layers=4"), capsys)
    one_line_error(code, err, "loss.disc_layers")


def test_a47_no_validation_images_trains_without_validation(shapes_dir, tmp_path, caplog):
    """data.num_val_images=0 is accepted, so it works: no validation PSNR or reconstruction grid, the
    whole data set trains, the export is written."""
    caplog.set_level(logging.INFO)
    out = tmp_path / "vae"
    train_vae.main(vae_args(shapes_dir, out, "data.num_val_images=0"))
    assert (out / "vae" / "config.json").is_file()
    assert not list((out / "images").glob("val_*")) if (out / "images").exists() else True
    assert "data.num_val_images=0: no validation" in caplog.text


# ----------------------------------------------------------------------------- rule 4: paths resolve against the run

def test_a38_resume_from_another_directory_trains_on_the_runs_own_data(shapes_dir, tmp_path, monkeypatch, caplog):
    """A run started with relative paths, resumed from a directory that holds another data/: the saved
    config records absolute paths, so the resume trains on the run's own 24 images (the data's
    fingerprint is unchanged), never on the 40 of the current directory."""
    from scripts.shapes import make_shapes
    first, other = tmp_path / "first", tmp_path / "other"
    shutil.copytree(shapes_dir, first / "data")
    make_shapes(other / "data", 40, image_size=32, seed=1)
    monkeypatch.chdir(first)
    train_vae.main(vae_args("data", "run", "--max-steps", "1"))
    monkeypatch.chdir(other)
    caplog.set_level(logging.INFO)
    train_vae.main(["--output-dir", str(first / "run"), "--resume", "latest", "--report-to", "none",
                    "--max-steps", "2"])
    assert "resumed from" in caplog.text and "training data changed" not in caplog.text
    saved = json.loads((first / "run" / "config.json").read_text())
    assert saved["data"]["path"] == str(first / "data")
    identities = [json.loads((first / "run" / "checkpoints" / f"step_{n}" / "identity.json").read_text())
                  for n in (1, 2)]
    assert identities[0]["data"] == identities[1]["data"]
    assert identities[1]["config"]["data"]["path"] == str(first / "data")


def test_a38_relative_paths_of_an_older_runs_config_resolve_against_the_run(shapes_dir, tmp_path, monkeypatch,
                                                                             caplog):
    """A config.json saved by an older version holds paths as typed: read against the run's folder, and
    the log says so; a relative name that exists only in the current directory is refused."""
    from scripts.shapes import make_shapes
    first, other = tmp_path / "first", tmp_path / "other"
    shutil.copytree(shapes_dir, first / "data")
    make_shapes(other / "data", 40, image_size=32, seed=1)
    run = first / "run"
    train_vae.main(vae_args(first / "data", run, "--max-steps", "1"))
    config = json.loads((run / "config.json").read_text())
    monkeypatch.chdir(other)
    resume = ["--output-dir", str(run), "--resume", "latest", "--report-to", "none", "--max-steps", "2"]
    config["data"]["path"] = "../data"                    # relative to the run folder
    (run / "config.json").write_text(json.dumps(config))
    caplog.set_level(logging.INFO)
    train_vae.main(resume)
    assert f"read against the run's folder {run}" in caplog.text and "data.path=../data" in caplog.text
    assert "training data changed" not in caplog.text
    config["data"]["path"] = "data"                       # relative to the directory the run was started from
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config key 'data.path': 'data' .* never against the current directory"):
        train_vae.main([*resume[:-1], "3"])


def test_a38_paths_are_absolute_where_given_and_empty_paths_are_unset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    cfg = load_config(UNetRunConfig, "unet", "tiny", ["data.path=data", "vae=runs/vae", "cache_dir=", "cond.type=text",
                                                      "cond.text_encoder=./clip"])
    assert (cfg.data.path, cfg.vae, cfg.cache_dir, cfg.cond.text_encoder) == (
        str(tmp_path / "data"), str(tmp_path / "runs" / "vae"), "", str(tmp_path / "clip"))
    assert load_config(UNetRunConfig, "unet", "tiny", ["data.path=someone/a-hub-set"]).data.path == "someone/a-hub-set"
    preset = tmp_path / "mine.json"
    preset.write_text(json.dumps({"cache_dir": "  "}))
    with pytest.raises(ConfigError, match="config key 'cache_dir': '  ' is not a path"):
        load_config(UNetRunConfig, "unet", str(preset))
    code, err = cli(train_vae.main, ["--config", "tiny", "--data", tmp_path / "data", "--output-dir", "",
                                     "--report-to", "none"], capsys)
    one_line_error(code, err, "--output-dir", "empty")
    assert not (tmp_path / ".lock").exists() and not (tmp_path / "config.json").exists()


def test_a35_a_moved_run_finds_its_own_frozen_vae(shapes_dir, tiny_vae_run, tmp_path, caplog):
    """The VAE the run came from is deleted and the run moved: --resume takes the run's own copy
    (frozen_vae/), and modules.run.export.training_vae (sample.py's lookup) finds it beside the export."""
    from modules.run.export import read_network_export, training_vae
    vae = tmp_path / "vae"
    shutil.copytree(tiny_vae_run / "vae", vae)
    train_unet.main(unet_args(shapes_dir, vae, tmp_path / "first" / "unet", f"cache_dir={tmp_path / 'cache'}"))
    shutil.rmtree(vae)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    moved = tmp_path / "moved" / "unet"
    export = read_network_export(moved / "unet_ema")
    assert training_vae(moved / "unet_ema", export.vae) == moved / "frozen_vae"
    caplog.set_level(logging.INFO)
    train_unet.main(["--output-dir", str(moved), "--resume", "latest", "--report-to", "none", "--max-steps", "3"])
    assert f"resuming with the run's own copy {moved / 'frozen_vae'}" in caplog.text
    assert f"resumed from {moved / 'checkpoints' / 'step_2'}" in caplog.text
    assert json.loads((moved / "checkpoints" / "step_3" / "training_state.json").read_text())["step"] == 3
    shutil.rmtree(moved / "frozen_vae")
    with pytest.raises(ModelFolderError, match="the VAE it was trained with is at none of"):
        training_vae(moved / "unet_ema", export.vae)


def test_a35_sample_py_samples_a_moved_run(shapes_dir, tiny_vae_run, tmp_path, capsys):
    import sample
    vae = tmp_path / "vae"
    shutil.copytree(tiny_vae_run / "vae", vae)
    train_unet.main(unet_args(shapes_dir, vae, tmp_path / "first" / "unet", f"cache_dir={tmp_path / 'cache'}",
                              "--max-steps", "1"))
    shutil.rmtree(vae)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    code, err = cli(sample.main, ["--unet", tmp_path / "moved" / "unet", "--out", tmp_path / "samples",
                                  "--num-samples", "2", "--steps", "1", "--class-label", "0"], capsys)
    assert code == 0, err


# ----------------------------------------------------------------------------- compiled runs

def test_a_compiled_runs_exports_load_in_sample_py_and_its_checkpoint_resumes_uncompiled(
        shapes_dir, tiny_vae_run, tmp_path, monkeypatch, capsys, caplog):
    """train.compile=true (torch.compile with the aot_eager backend here: $LDM_COMPILE_BACKEND) writes
    exports and checkpoints under the network's own parameter names: sample.py samples both exports,
    and an uncompiled run resumes the compiled run's checkpoint."""
    import sample
    from modules.core.compiling import COMPILE_BACKEND_ENV
    from modules.run.export import read_weights
    from safetensors.torch import load_file
    monkeypatch.setenv(COMPILE_BACKEND_ENV, "aot_eager")
    out = tmp_path / "compiled"
    common = [f"cache_dir={tmp_path / 'cache'}"]
    train_unet.main(unet_args(shapes_dir, tiny_vae_run, out, "train.compile=true", *common))
    for folder in ("unet", "unet_ema"):
        assert not [k for k in read_weights(out / folder) if "_orig_mod" in k]
    step = out / "checkpoints" / "step_2"
    assert not [k for f in step.glob("*.safetensors") for k in load_file(str(f)) if "_orig_mod" in k]
    for folder in ("unet", "unet_ema"):
        code, err = cli(sample.main, ["--unet", out / folder, "--out", tmp_path / f"samples_{folder}",
                                      "--num-samples", "2", "--steps", "1", "--class-label", "0"], capsys)
        assert code == 0, err
    caplog.set_level(logging.INFO)
    train_unet.main(unet_args(shapes_dir, tiny_vae_run, out, "--resume", "latest", "--max-steps", "3",
                              "train.compile=false", *common))
    assert f"resumed from {step}" in caplog.text
    assert json.loads((out / "checkpoints" / "step_3" / "training_state.json").read_text())["step"] == 3


# ----------------------------------------------------------------------------- rule 2: the one write module

PRECIOUS = b"a file outside the output folder\n"


def plant_links(out: Path, outside: Path, names: list[str]) -> dict[Path, Path]:
    """A link at each of ``names`` in ``out`` to its own file outside; returns link -> target."""
    links = {}
    for i, name in enumerate(names):
        target = outside / f"target_{i}"
        target.write_bytes(PRECIOUS)
        link = out / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
        links[link] = target
    return links


def test_a06_links_planted_under_a_runs_fixed_names_are_never_written_through(shapes_dir, tiny_vae_run, tmp_path):
    out, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    grid = "images/samples_rows_1_2_8_steps_{:07d}.png"
    names = [*(f"checkpoints/.tmp_step_{n}" for n in (1, 2)), *(f"{folder}{suffix}" for folder in
             ("unet", "unet_ema", "frozen_vae") for suffix in (".tmp", ".old")),
             "config.json", ".ldm-output.json", *(grid.format(n) for n in (1, 2))]
    links = plant_links(out, outside, names)
    folder_target = outside / "folder"
    folder_target.mkdir()
    (out / "checkpoints" / ".tmp_step_3").symlink_to(folder_target, target_is_directory=True)
    train_unet.main(unet_args(shapes_dir, tiny_vae_run, out, "train.image_log_every=1", "--max-steps", "3",
                              f"cache_dir={tmp_path / 'cache'}"))
    assert {target: target.read_bytes() for target in links.values()} == {t: PRECIOUS for t in links.values()}
    assert not any(folder_target.iterdir())
    assert (out / "unet" / "model.safetensors").is_file() and (out / grid.format(3)).is_file()
    assert not [p for p in out.rglob("*") if p.is_symlink()]


def test_a06_a_link_planted_at_the_lock_is_refused_and_not_written_through(shapes_dir, tiny_vae_run, tmp_path, capsys):
    out, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    links = plant_links(out, outside, [".lock"])
    code, err = cli(train_unet.main, unet_args(shapes_dir, tiny_vae_run, out), capsys)
    one_line_error(code, err, f"{out / '.lock'} is a link")
    assert all(target.read_bytes() == PRECIOUS for target in links.values())


def full_disk_run(script: str, argv: list, limit: int) -> subprocess.CompletedProcess:
    """``script``'s command line where no file may grow past ``limit`` bytes (RLIMIT_FSIZE: the kernel
    answers EFBIG as it answers ENOSPC on a full disk). Imports come first: torch's own need a usable
    temporary folder, which a full disk does not have either."""
    code = (f"import resource, signal, sys; import {script}; from modules.config.cli import run_cli; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); run_cli({script}.main, sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("limit", [0, 1])
def test_a15_a_lock_or_marker_that_cannot_be_written_on_a_full_disk_is_one_line(limit, shapes_dir, tiny_vae_run,
                                                                                 tmp_path):
    """The output folder's lock record and marker cannot be written (0: not a byte; 1: the lock's first
    byte only): one line naming the folder, exit 2, and the folder is not taken for a run."""
    for script, argv in (("train_vae", vae_args(shapes_dir, tmp_path / "vae")),
                         ("train_unet", unet_args(shapes_dir, tiny_vae_run, tmp_path / "unet"))):
        out = Path(argv[argv.index("--output-dir") + 1])
        done = full_disk_run(script, argv, limit)
        one_line_error(done.returncode, done.stderr, f"cannot write to output folder {out}", "File too large")
        assert not (out / ".ldm-output.json").exists() and not (out / "config.json").exists()


# ----------------------------------------------------------------------------- rule 7: no traceback

def diffusers_dit_folder(folder: Path, **changes) -> Path:
    """A diffusers DiT folder as init_from reads it (config.json + safetensors weights) for dit-tiny's sizes
    (hidden 32 = 2 heads x 16, 2 blocks, 5 classes, patch 2), with ``changes`` to its config."""
    from safetensors.torch import save_file
    folder.mkdir(parents=True)
    config = {"_class_name": "DiTTransformer2DModel", "norm_type": "ada_norm_zero", "patch_size": 2,
              "in_channels": 4, "out_channels": None, "num_attention_heads": 2, "attention_head_dim": 16,
              "num_layers": 2, "num_embeds_ada_norm": 5, "sample_size": 4, "norm_eps": 1e-6,
              "activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False}
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    save_file({"transformer_blocks.0.ff.net.0.proj.weight": torch.zeros(128, 32)},
              str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


@pytest.mark.parametrize("field, value", [
    ("num_layers", "12"), ("num_layers", [2]), ("num_layers", 2.5), ("num_layers", 0), ("num_layers", 10 ** 12),
    ("num_attention_heads", "2"), ("attention_head_dim", [16]), ("patch_size", "2"), ("patch_size", True),
    ("in_channels", "4"), ("in_channels", None), ("out_channels", "8"), ("num_embeds_ada_norm", "5"),
    ("sample_size", "4"), ("norm_eps", "1e-6"), ("attention_bias", "yes"), ("activation_fn", 3),
    ("norm_elementwise_affine", 0)])
def test_a28_a_wrongly_typed_init_from_config_is_one_line_naming_the_field(field, value, tmp_path):
    from support import network_of

    from modules.interop.dit import load_init_weights
    folder = diffusers_dit_folder(tmp_path / "dit", **{field: value})
    cfg = load_config(UNetRunConfig, "unet", "dit-tiny", ["objective=flow", "model.hidden_size=32", "model.num_heads=2",
                                                          "cond.type=class", f"init_from={folder}"])
    model = network_of(cfg, num_classes=5)
    with pytest.raises(ModelFolderError, match=f"init_from {folder / 'config.json'}: diffusers config field "
                                               f"'{field}' = "):
        load_init_weights(model, cfg, model.sizes)


def _without_sizes(record: dict) -> dict:
    name = sorted(record["files"])[0]
    record["files"][name] = {"digest": record["files"][name]["digest"]}
    return record


@pytest.mark.parametrize("damage", [
    lambda path: path.write_bytes(b"\xff\xfe{\x00"),
    lambda path: path.write_text("[]"),
    lambda path: path.write_text(json.dumps(_without_sizes(json.loads(path.read_text())))),
], ids=["not_utf8", "a_list", "an_entry_without_size"])
def test_a09_a_damaged_checkpoint_manifest_falls_back_to_the_previous_checkpoint(damage, shapes_dir, tmp_path,
                                                                                 caplog, capsys):
    out = tmp_path / "vae"
    train_vae.main(vae_args(shapes_dir, out))
    checkpoints = out / "checkpoints"
    damage(checkpoints / "step_2" / "manifest.json")
    code, err = cli(train_vae.main, vae_args(shapes_dir, out, "--resume", checkpoints / "step_2"), capsys)
    one_line_error(code, err, f"cannot resume from {checkpoints / 'step_2'}")
    caplog.set_level(logging.INFO)
    train_vae.main(vae_args(shapes_dir, out, "--resume", "latest", "--max-steps", "3"))
    assert f"skipping checkpoint {checkpoints / 'step_2'}" in caplog.text
    assert f"resumed from {checkpoints / 'step_1'}" in caplog.text
    assert json.loads((checkpoints / "step_3" / "training_state.json").read_text())["step"] == 3


# ----------------------------------------------------------------------------- text encoders

@pytest.mark.parametrize("layer", ["last", "penultimate"])
def test_a_text_encoder_whose_config_asks_for_an_attention_mask_gets_one(layer, tmp_path):
    """use_attention_mask=True in the encoder's config.json (as diffusers reads it): the padding positions
    are masked, and the embeddings equal transformers' CLIPTextModel called with the tokenizer's mask."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from modules.interop.clip import TextEncoder
    from scripts.tiny_clip import write_tiny_clip
    folder = write_tiny_clip(tmp_path / "clip")
    config_path = folder / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_attention_mask": True}))
    prompts = ["a red circle on a striped background", "blue", ""]
    ours = TextEncoder(str(folder), layer).encode(prompts)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    model = CLIPTextModel.from_pretrained(str(folder / "text_encoder")).eval()
    tokens = tokenizer(prompts, padding="max_length", max_length=ours.shape[1], truncation=True, return_tensors="pt")
    with torch.no_grad():
        output = model(tokens["input_ids"], attention_mask=tokens["attention_mask"], output_hidden_states=True)
        unmasked = model(tokens["input_ids"]).last_hidden_state
        theirs = (output.last_hidden_state if layer == "last"
                  else getattr(model, "text_model", model).final_layer_norm(output.hidden_states[-2]))
    assert (unmasked - output.last_hidden_state).abs().max() > 1e-3      # the mask matters here
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the quickstart

class Interrupted(Exception):
    """Stands for a kill while the example data is written."""


def test_a19_the_quickstart_writes_its_data_whole_and_stops_after_a_stage_stopped_by_sigterm(tmp_path, monkeypatch,
                                                                                             capsys):
    from PIL import Image

    from modules.run import harness
    sys.path.insert(0, str(ROOT / "scripts"))
    import quickstart
    out = tmp_path / "qs"
    argv = ["--out", str(out), "--num-images", "24", "--vae-steps", "3", "--unet-steps", "2"]
    real_fromarray, calls = Image.fromarray, []

    def interrupted_after_10_images(*args, **kwargs):
        calls.append(1)
        if len(calls) > 20:                             # an image and its mask each
            raise Interrupted
        return real_fromarray(*args, **kwargs)

    monkeypatch.setattr(Image, "fromarray", interrupted_after_10_images)
    with pytest.raises(Interrupted):
        quickstart.main(argv)
    monkeypatch.setattr(Image, "fromarray", real_fromarray)
    assert not (out / "data").exists() and not (out / "data.tmp").exists()
    (out / "data.tmp" / "circle").mkdir(parents=True)    # what a SIGKILL would leave
    (out / "data.tmp" / "circle" / "00000.png").write_bytes(b"half")

    real_update, signalled = harness.Run.update, []

    def sigterm_at_the_first_step(self, *args, **kwargs):
        update = real_update(self, *args, **kwargs)
        if not signalled:
            signalled.append(self.script)
            os.kill(os.getpid(), signal.SIGTERM)        # pre-emption: the stage saves this step and returns
        return update

    monkeypatch.setattr(harness.Run, "update", sigterm_at_the_first_step)
    capsys.readouterr()
    assert quickstart.main(argv) == 0
    printed = capsys.readouterr().out
    assert signalled == ["train_vae"]
    assert f"the run in {out / 'vae'} stopped at step 1 of 3; the quickstart stops here" in printed
    assert len(list((out / "data").rglob("*.png"))) == 2 * 24 and not (out / "data.tmp").exists()
    assert not (out / "unet").exists() and not list(out.glob("samples_*")) and not (out / "grid.png").exists()


# ----------------------------------------------------------------------------- SIGTERM to a 2-process run

RANK_WRAPPER = """import os, runpy, sys
sys.argv[0] = {script!r}
sys.path.insert(0, os.path.dirname({script!r}))
code = 0
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
with open(os.path.join({folder!r}, "rank" + os.environ["RANK"] + ".rc"), "w") as f:
    f.write(str(code))
sys.exit(code)
"""


def test_a43_sigterm_to_a_whole_two_process_run_saves_one_step_and_the_ranks_exit_0(shapes_dir, tiny_vae_run,
                                                                                     tmp_path, caplog):
    """SIGTERM to the process group of `accelerate launch` (2 CPU processes): both ranks save the same
    step and exit 0; the launcher, which gets the signal too, forwards it to the ranks, waits for them
    (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default) and exits 128 + 15 = 143 by its own design
    (accelerate's launcher re-raises the signal it received). --resume latest continues from that step."""
    import psutil

    from modules.run.checkpoint import checkpoint_problem
    out, codes = tmp_path / "run", tmp_path / "codes"
    codes.mkdir()
    wrapper = tmp_path / "rank.py"
    wrapper.write_text(RANK_WRAPPER.format(script=str(ROOT / "train_unet.py"), folder=str(codes)))
    argv = unet_args(shapes_dir, tiny_vae_run, out, "--max-steps", "500", "train.batch_size=4",
                     "train.checkpoint_every=2", "train.log_every=1000", f"cache_dir={tmp_path / 'cache'}")
    log = tmp_path / "launch.log"
    with open(log, "w") as f:
        launcher = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                     "accelerate_configs/cpu_2proc.yaml", str(wrapper), *argv], cwd=ROOT, env=ENV,
                                    stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list((out / "checkpoints").glob("step_*")):
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.02)
        os.killpg(launcher.pid, signal.SIGTERM)
        assert launcher.wait(timeout=300) == 128 + signal.SIGTERM, log.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    text = log.read_text()
    assert {p.name: p.read_text() for p in codes.iterdir()} == {"rank0.rc": "0", "rank1.rc": "0"}, text[-3000:]
    saved = [int(line.split("saved step ")[1].split(",")[0]) for line in text.splitlines()
             if "SIGTERM received: saved step" in line]
    assert len(saved) == 2 and saved[0] == saved[1], text[-3000:]
    step = saved[0]
    newest = max(int(p.name.split("_")[1]) for p in (out / "checkpoints").glob("step_*"))
    assert newest == step and checkpoint_problem(out / "checkpoints" / f"step_{step}", deep=True) is None
    assert "Traceback" not in text
    assert not psutil.pid_exists(launcher.pid) or psutil.Process(launcher.pid).status() == psutil.STATUS_ZOMBIE
    caplog.set_level(logging.INFO)
    train_unet.main([*argv[:-6], "--resume", "latest", "--max-steps", str(step + 1), f"cache_dir={tmp_path / 'cache'}"])
    assert f"resumed from {out / 'checkpoints' / f'step_{step}'}" in caplog.text
