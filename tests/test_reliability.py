"""Reliability: kills, pre-emption, damaged checkpoints, non-finite batches, full disks and
dying peers lose no work; untrusted weight files are never unpickled.

RELIABILITY.md maps every fault and bad input to the test that shows it. Runs use the tiny
presets on CPU. Processes that get signals run as subprocesses (OMP_NUM_THREADS=1) whose
output goes to a log file; every wait polls for a file, a log line or an exit with a generous
limit, so a slow machine makes these tests slower, never wrong.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

import modules.run.export as export_module
import train_unet
import train_vae
from modules.config.cli import run_cli
from modules.config.io import from_dict
from modules.config.schema import DataConfig, UNetRunConfig, VAERunConfig, network_sizes
from modules.core.networks import build_network
from modules.core.networks.vae import AutoencoderKL
from modules.data.dataset import build_dataset
from modules.data.latent_store import StoreSpec
from modules.durable import manifest
from modules.data.order import ResumableBatchSampler
from modules.durable import sha256_file
from modules.errors import ModelFolderError
from modules.interop.vae import load_vae
from modules.run.checkpoint import MANIFEST, STATE_NAME, checkpoint_problem
from modules.run.export import load_network, read_weights

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
WAIT_S = 600          # bound on any one wait; reached only when something is broken
POLL_S = 0.005
UNET_STEPS = 12
VAE_STEPS = 10
LAUNCH_2PROC = ["-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_2proc.yaml"]
# A resumed run's weights equal the uninterrupted run's bit for bit: the same single-threaded
# float operations in the same order (see one_thread).
RESUME_ATOL = 0.0


# ----------------------------------------------------------------------------- runs

def unet_args(stage2, out: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", "--data", str(stage2.data), "--vae", str(stage2.vae), "--output-dir", str(out),
            "--report-to", "none", "--max-steps", str(UNET_STEPS), "cond.type=class", "train.checkpoint_every=1",
            "train.image_log_every=1000", f"cache_dir={stage2.cache}", *extra]


def vae_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--config", "tiny", "--data", str(data), "--output-dir", str(out), "--report-to", "none",
            "--max-steps", str(VAE_STEPS), "train.checkpoint_every=1", "train.val_every=1000",
            "train.image_log_every=1000", "loss.disc_start=3", "scale_samples=4", *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use one thread like the subprocesses: the same float summation order
    (so weights compare exactly), and no OpenMP threads spinning for a core a busy machine
    does not have."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stage2(shapes_dir, tiny_vae_run, tmp_path_factory):
    """The uninterrupted reference: class-conditional shortcut UNet, UNET_STEPS steps, a
    checkpoint every step; its latent cache is shared by the other runs."""
    root = tmp_path_factory.mktemp("reliability")
    s = SimpleNamespace(data=shapes_dir, vae=tiny_vae_run, cache=root / "cache", reference=root / "reference")
    train_unet.main(unet_args(s, s.reference))
    return s


class Run:
    """A script in a subprocess, its stdout and stderr in a log file."""

    def __init__(self, argv: list[str], log: Path, new_session: bool):
        self.log = log
        self.new_session = new_session
        self.children: list[psutil.Process] = []   # started by it in sessions of their own
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=new_session)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return self.text()[-4000:]

    def wait_until(self, condition, what: str, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while not (found := condition()):
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode} before {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.tail()}")
            time.sleep(POLL_S)
        return found

    def finish(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.tail()}") from None

    def stop_now(self) -> None:
        """Freeze the process (SIGSTOP) and return once it is stopped."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        process = psutil.Process(self.proc.pid)
        while process.status() not in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE):
            time.sleep(POLL_S)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def cleanup(self) -> None:
        for child in self.children:
            try:
                if child.is_running():      # psutil also guards against a reused pid
                    child.kill()
            except psutil.NoSuchProcess:
                pass
        if self.proc.poll() is None:
            if self.new_session:
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
            self.proc.wait()


@pytest.fixture
def spawn(tmp_path):
    """Start subprocesses; any still running at the end of the test are killed."""
    started: list[Run] = []

    def start(argv: list[str], name: str, new_session: bool = False) -> Run:
        run = Run(argv, tmp_path / f"{name}.log", new_session)
        started.append(run)
        return run

    yield start
    for run in started:
        run.cleanup()


def newest_valid(checkpoints: Path) -> int:
    """Step of the newest complete checkpoint, 0 if none (tolerates folders pruned meanwhile)."""
    newest = 0
    for path in checkpoints.glob("step_*"):
        try:
            if checkpoint_problem(path) is None:
                newest = max(newest, int(path.name.split("_")[1]))
        except OSError:
            continue
    return newest


def half_written(checkpoints: Path, min_step: int = 0) -> list[Path]:
    """Checkpoint folders being written: some files, no manifest yet."""
    found = []
    for path in checkpoints.glob(".tmp_step_*"):
        try:
            step = int(path.name.rsplit("_", 1)[1])
            if step >= min_step and any(path.iterdir()) and not (path / MANIFEST).exists():
                found.append(path)
        except OSError:     # renamed or removed meanwhile
            continue
    return found


def kill_inside(run: Run, partial, what: str) -> list[Path]:
    """SIGKILL ``run`` while ``partial()`` lists unfinished files, checked with the process
    frozen, so the kill provably lands inside the write."""
    while True:
        run.wait_until(partial, what)
        run.stop_now()
        found = partial()
        if found:
            run.kill()
            return found
        os.kill(run.proc.pid, signal.SIGCONT)


def kill_at_random_moment(run: Run, checkpoints: Path, after_step: int, rng: random.Random) -> None:
    """SIGKILL ``run`` a random moment (0 to 0.3 s) after it saved a step beyond ``after_step``."""
    run.wait_until(lambda: newest_valid(checkpoints) > after_step, f"a checkpoint after step {after_step}")
    time.sleep(rng.uniform(0.0, 0.3))
    assert run.proc.poll() is None, "the run finished before the kill; give it more steps"
    run.kill()


def max_difference(a: Path, b: Path) -> float:
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def assert_same_weights(a: Path, b: Path, atol: float = RESUME_ATOL) -> None:
    wa, wb = read_weights(a), read_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=atol, msg=f"{a} vs {b}: {key}")


def assert_matches_reference(stage2, out: Path) -> None:
    """Exported online and EMA weights and both EMAs of the last checkpoint equal the reference's."""
    for folder in ("unet", "unet_ema"):
        assert_same_weights(out / folder, stage2.reference / folder)
    last = f"checkpoints/step_{UNET_STEPS}/ema_rank0.safetensors"
    assert_same_weights(out / last, stage2.reference / last)


def assert_no_leftovers(out: Path) -> None:
    leftovers = list((out / "checkpoints").glob(".tmp_step_*"))
    leftovers += [p for p in out.iterdir() if p.suffix in (".tmp", ".old")]
    assert not leftovers, leftovers


# ----------------------------------------------------------------------------- 1. hard kills

def test_sigkill_during_checkpoint_and_export_and_at_random_then_resume_gives_the_same_unet(
        stage2, tmp_path, spawn, caplog):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    args = unet_args(stage2, out, "train.keep_checkpoints=2", "--resume", "latest")
    rng = random.Random(0)

    # Inside a checkpoint write: the half-written folder is never resumed from.
    run = spawn(["train_unet.py", *args], "1_mid_checkpoint")
    (partial,) = kill_inside(run, lambda: half_written(checkpoints, min_step=2), "a checkpoint being written")
    previous = newest_valid(checkpoints)
    assert previous == int(partial.name.rsplit("_", 1)[1]) - 1

    # At a random moment.
    run = spawn(["train_unet.py", *args], "2_random")
    kill_at_random_moment(run, checkpoints, previous, rng)
    assert f"resumed from {checkpoints / f'step_{previous}'}" in run.text()
    previous = newest_valid(checkpoints)

    # Inside the export that follows a checkpoint.
    run = spawn(["train_unet.py", *args], "3_mid_export")
    exports = [out / name for name in ("unet.tmp", "unet_ema.tmp", "unet.old", "unet_ema.old")]
    # (the random kill may itself have landed in an export: its leftovers go before "resumed from")
    kill_inside(run, lambda: "resumed from" in run.text() and [p for p in exports if p.exists()],
                "an export being written")
    assert f"resumed from {checkpoints / f'step_{previous}'}" in run.text()
    previous = newest_valid(checkpoints)
    assert previous < UNET_STEPS

    # The last run finishes: same weights (online, EMA, teacher EMA) as the uninterrupted run.
    caplog.set_level(logging.INFO)
    train_unet.main(args)
    assert f"resumed from {checkpoints / f'step_{previous}'}" in caplog.text
    assert_matches_reference(stage2, out)
    assert_no_leftovers(out)


def test_killed_after_the_last_checkpoint_resume_writes_the_exports(stage2, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stage2.reference, out)
    # What a kill between the last checkpoint and its export leaves: an export being replaced.
    shutil.rmtree(out / "unet_ema")
    (out / "unet").rename(out / "unet.old")
    train_unet.main(unet_args(stage2, out, "--resume", "latest"))
    assert_matches_reference(stage2, out)
    assert load_network(out / "unet_ema") is not None
    assert not (out / "unet.old").exists()


def test_an_export_interrupted_between_its_renames_is_put_back_at_the_next_start(stage2, tmp_path):
    """A kill between ``unet -> unet.old`` and ``unet.tmp -> unet`` leaves no ``unet/``: the
    next start puts the previous export back (sample.py can use it again) and drops the leftovers."""
    out = tmp_path / "run"
    shutil.copytree(stage2.reference, out)
    (out / "unet").rename(out / "unet.old")
    shutil.copytree(out / "unet_ema", out / "unet.tmp")
    shutil.copytree(out / "unet_ema", out / "unet_ema.old")
    with pytest.raises(SystemExit):   # refused: a new run may not take this folder, but it is repaired first
        run_cli(train_unet.main, unet_args(stage2, out))
    assert_same_weights(out / "unet", stage2.reference / "unet")
    assert not any((out / name).exists() for name in ("unet.old", "unet.tmp", "unet_ema.old"))


def test_sigkill_stage1_several_times_then_resume_gives_the_same_vae(shapes_dir, tmp_path, spawn):
    reference, out = tmp_path / "reference", tmp_path / "run"
    checkpoints = out / "checkpoints"
    args = vae_args(shapes_dir, out, "--resume", "latest")
    rng = random.Random(1)
    train_vae.main(vae_args(shapes_dir, reference))
    run = spawn(["train_vae.py", *args], "1_random")
    kill_at_random_moment(run, checkpoints, 1, rng)
    previous = newest_valid(checkpoints)

    run = spawn(["train_vae.py", *args], "2_mid_checkpoint")
    kill_inside(run, lambda: half_written(checkpoints, min_step=previous + 1), "a checkpoint being written")
    assert f"resumed from {checkpoints / f'step_{previous}'}" in run.text()
    assert newest_valid(checkpoints) < VAE_STEPS

    train_vae.main(args)
    assert_same_weights(out / "vae", reference / "vae")
    last = f"checkpoints/step_{VAE_STEPS}"
    for name in ("model.safetensors", "model_1.safetensors"):    # autoencoder and discriminator
        assert_same_weights(out / last / name, reference / last / name)
    assert_no_leftovers(out)
    # Killed after the last checkpoint, before the export: the resume exports.
    shutil.rmtree(out / "vae")
    train_vae.main(args)
    assert_same_weights(out / "vae", reference / "vae")
    assert load_vae(out).config.scale_factor == load_vae(reference).config.scale_factor


# ----------------------------------------------------------------------------- 2. SIGTERM

@pytest.mark.parametrize("target", ["process", "process_group"])
def test_sigterm_saves_a_checkpoint_exits_0_and_resume_continues(target, stage2, tmp_path, spawn, caplog):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    # Checkpoints every 2 steps, so the one SIGTERM forces is usually an odd step; a DataLoader
    # worker shares the process group and must survive the signal until the main process saved.
    extra = ["train.checkpoint_every=2"] + (["data.num_workers=1"] if target == "process_group" else [])
    run = spawn(["train_unet.py", *unet_args(stage2, out, *extra)], "sigterm", new_session=True)
    run.wait_until(lambda: newest_valid(checkpoints) >= 2, "the first checkpoint")
    sent = time.monotonic()
    if target == "process":
        run.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(run.proc.pid, signal.SIGTERM)
    assert run.finish() == 0, run.tail()
    grace = time.monotonic() - sent
    assert grace < 30, f"took {grace:.1f} s to save and exit"  # Slurm's and Kubernetes' default grace
    print(f"SIGTERM to exit 0: {grace:.2f} s")
    log = run.text()
    saved = newest_valid(checkpoints)
    assert 2 <= saved < UNET_STEPS
    assert f"SIGTERM received: saved step {saved}, exiting" in log and "Traceback" not in log
    if target == "process_group":                       # the worker exits with the main process
        deadline = time.monotonic() + WAIT_S
        while group_alive(run.proc.pid):
            assert time.monotonic() < deadline, "a DataLoader worker outlived the run"
            time.sleep(POLL_S)
    caplog.set_level(logging.INFO)
    train_unet.main(unet_args(stage2, out, "--resume", "latest"))
    assert f"resumed from {checkpoints / f'step_{saved}'}" in caplog.text
    assert_matches_reference(stage2, out)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


# ----------------------------------------------------------------------------- 3. damaged checkpoints

def test_damaged_latest_checkpoints_fall_back_to_the_previous_good_one(stage2, tmp_path, caplog, capsys):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    keep = "train.keep_checkpoints=6"
    train_unet.main(unet_args(stage2, out, keep, "--max-steps", "5"))
    # step_6: copied without its manifest (an unfinished copy); step_5: truncated file;
    # step_4: missing file; step_3: EMA file of the right size but garbage (fails to load);
    # step_2: good.
    shutil.copytree(checkpoints / "step_5", checkpoints / "step_6")
    (checkpoints / "step_6" / MANIFEST).unlink()
    model = checkpoints / "step_5" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    (checkpoints / "step_4" / "optimizer.bin").unlink()
    ema = checkpoints / "step_3" / "ema_rank0.safetensors"
    ema.write_bytes(b"\xff" * ema.stat().st_size)

    # An explicit --resume of a damaged checkpoint is refused, naming the problem.
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_unet.main, unet_args(stage2, out, keep, "--resume", str(checkpoints / "step_4")))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: cannot resume from {checkpoints / 'step_4'}: missing file optimizer.bin" in err

    caplog.set_level(logging.INFO)
    train_unet.main(unet_args(stage2, out, keep, "--resume", "latest"))
    log = caplog.text
    assert f"skipping checkpoint {checkpoints / 'step_6'}: no {MANIFEST}" in log
    assert f"skipping checkpoint {checkpoints / 'step_5'}: file model.safetensors has" in log
    assert f"skipping checkpoint {checkpoints / 'step_4'}: missing file optimizer.bin" in log
    assert f"checkpoint {checkpoints / 'step_3'} failed to load" in log
    assert f"falling back to {checkpoints / 'step_2'}" in log
    assert f"resumed from {checkpoints / 'step_2'}" in log
    assert_matches_reference(stage2, out)
    assert all(checkpoint_problem(checkpoints / f"step_{s}") is None for s in range(UNET_STEPS - 5, UNET_STEPS + 1))


# ----------------------------------------------------------------------------- 4. non-finite steps

def poison_cache(clean_root: Path, poisoned_root: Path, rows: list[int]) -> None:
    """Copy the latent store with the latents (plain and flipped) of ``rows`` set to NaN."""
    from modules.data.latent_store import SHARD_MANIFEST, write_index
    (folder,) = clean_root.glob("store_*")
    target = poisoned_root / folder.name
    shutil.copytree(folder, target)
    shard = target / "shard_00000"
    for name in ("mean", "mean_flip"):
        values = np.load(shard / f"{name}.npy")
        values[rows] = np.nan
        np.save(shard / f"{name}.npy", values)
    # Sealed like a real store (the latents are what a broken VAE could have written), so the
    # checksums do not flag it as damaged and rebuild it.
    record = json.loads((shard / SHARD_MANIFEST).read_text())
    record["files"] = manifest(shard, exclude=(SHARD_MANIFEST,))
    (shard / SHARD_MANIFEST).write_text(json.dumps(record))
    index = json.loads((target / "index.json").read_text())
    write_index(target, StoreSpec(**{**index["spec"], "class_names": tuple(index["spec"]["class_names"])}), 1)


def test_a_nan_batch_is_skipped_and_counted(stage2, tmp_path, monkeypatch, caplog):
    steps, batch = 6, 8
    order = ResumableBatchSampler(24, batch, seed=0)
    batches = [[i for i, _ in b] for _, b in zip(range(steps), order)]
    poisoned = batches[1][0]                             # first seen at step 2
    bad = [s + 1 for s in range(steps) if poisoned in batches[s]]
    assert len(bad) >= 2 and bad[0] == 2
    poison_cache(stage2.cache, tmp_path / "cache", [poisoned])

    logged = {}
    from accelerate import Accelerator
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, **kw: logged.__setitem__(step, values))
    caplog.set_level(logging.WARNING)
    out = tmp_path / "run"
    train_unet.main(unet_args(stage2, out, "--max-steps", str(steps), "train.log_every=1",
                              "train.keep_checkpoints=10", f"cache_dir={tmp_path / 'cache'}"))
    warned = [r.getMessage() for r in caplog.records if "non-finite loss or gradient, update skipped" in r.getMessage()]
    assert [int(m.split()[1].rstrip(":")) for m in warned] == bad
    every_step = range(1, steps + 1)
    assert [logged[s]["bad_steps"] for s in every_step] == [sum(b <= s for b in bad) for s in every_step]
    saved_state = json.loads((out / "checkpoints" / f"step_{steps}" / STATE_NAME).read_text())
    assert saved_state["bad_steps"] == len(bad) and saved_state["step"] == steps
    # A skipped step leaves the weights and both EMAs as they were; good steps move them.
    for s in range(2, steps + 1):
        now, before = out / "checkpoints" / f"step_{s}", out / "checkpoints" / f"step_{s - 1}"
        for name in ("model.safetensors", "ema_rank0.safetensors"):
            difference = max_difference(now / name, before / name)
            assert (difference == 0) == (s in bad), (s, name, difference)
    for folder in ("unet", "unet_ema"):
        assert all(torch.isfinite(w).all() for w in read_weights(out / folder).values())


def test_consecutive_nan_steps_abort_with_the_last_good_weights_saved(stage2, tmp_path, capsys):
    poison_cache(stage2.cache, tmp_path / "bad_cache", list(range(24)))
    out = tmp_path / "run"
    args = unet_args(stage2, out, "train.max_bad_steps=3", "train.checkpoint_every=1000")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_unet.main, [*args, f"cache_dir={tmp_path / 'bad_cache'}"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    # Counted at the next logging step (the tiny preset logs every 5), which saves that step.
    assert (f"error: 3 consecutive non-finite steps at step 3; saved the last good weights in "
            f"{out / 'checkpoints'} (step_5: ") in err and "Traceback" not in err
    saved = out / "checkpoints" / "step_5"
    assert checkpoint_problem(saved) is None
    cfg = from_dict(UNetRunConfig, json.loads((out / "config.json").read_text()))
    sizes = network_sizes(cfg, load_vae(stage2.vae).config, 3)     # the shapes data set has 3 classes
    torch.manual_seed(cfg.train.seed)
    initial = dict(build_network(cfg.model, cfg.cond, sizes).named_parameters())
    weights, emas = read_weights(saved / "model.safetensors"), read_weights(saved / "ema_rank0.safetensors")
    assert weights.keys() == initial.keys()
    for key, value in initial.items():
        assert torch.equal(weights[key], value), key
        for ema in ("sample", "teacher"):
            assert torch.equal(emas[f"{ema}.shadow.{key}"], value), (ema, key)
    # With the data repaired, the run resumes from that checkpoint.
    train_unet.main([*args, "--resume", "latest", "--max-steps", "7"])
    assert newest_valid(out / "checkpoints") == 7


# ----------------------------------------------------------------------------- 5. disk full

def test_disk_full_at_checkpoint_time_is_a_clear_error_and_keeps_the_previous_checkpoint(stage2, tmp_path, spawn):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    train_unet.main(unet_args(stage2, out, "--max-steps", "2"))
    before = {p.name: p.read_bytes() for p in (checkpoints / "step_2").iterdir()}
    # A real failed write: files may not grow past the model file's size (RLIMIT_FSIZE; the
    # kernel answers EFBIG, as it answers ENOSPC on a full disk), so the optimizer state fails.
    limit = (checkpoints / "step_2" / "model.safetensors").stat().st_size + 4096
    limited = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
               "sys.argv[0] = 'train_unet.py'; runpy.run_path('train_unet.py', run_name='__main__')")
    run = spawn(["-c", limited, *unet_args(stage2, out, "--resume", "latest")], "disk_full")
    assert run.finish() == 2, run.tail()
    log = run.text()
    assert f"error: could not write checkpoint {checkpoints / 'step_3'}" in log
    assert "the previous checkpoints are untouched" in log and "Traceback" not in log
    assert checkpoint_problem(checkpoints / "step_2") is None
    assert {p.name: p.read_bytes() for p in (checkpoints / "step_2").iterdir()} == before
    assert not list(checkpoints.glob(".tmp_step_*"))
    train_unet.main(unet_args(stage2, out, "--resume", "latest"))
    assert_matches_reference(stage2, out)


def test_disk_full_while_exporting_is_a_clear_error_and_keeps_the_previous_export(stage2, tmp_path, monkeypatch,
                                                                                   capsys):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    real_save = export_module.save_model_folder
    calls = []

    def save_until_full(folder, state_dict, config, *diffusers):
        if Path(folder).name in ("unet", "unet_ema"):    # not the run's frozen_vae copy (also a model folder)
            calls.append(folder)
            if len(calls) == 5:                          # step 3's first export
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))
        return real_save(folder, state_dict, config, *diffusers)

    monkeypatch.setattr(export_module, "save_model_folder", save_until_full)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_unet.main, unet_args(stage2, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: could not write the exported models in {out}" in err and "No space left on device" in err
    assert "checkpoint step_3 is saved" in err and "Traceback" not in err
    assert checkpoint_problem(checkpoints / "step_3") is None
    # The previous export (step 2) is intact and loads.
    assert_same_weights(out / "unet", checkpoints / "step_2" / "model.safetensors", atol=0)
    assert load_network(out / "unet_ema") is not None
    monkeypatch.setattr(export_module, "save_model_folder", real_save)
    train_unet.main(unet_args(stage2, out, "--resume", "latest"))
    assert_matches_reference(stage2, out)


# ----------------------------------------------------------------------------- 6. a peer dies or hangs

@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_two_process_run_ends_when_a_peer_dies_or_hangs_and_resumes(fault, stage2, tmp_path, spawn, caplog):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    timeout_s = 15
    run = spawn([*LAUNCH_2PROC, "train_unet.py",
                 *unet_args(stage2, out, "--max-steps", "500", "train.batch_size=4",
                            f"train.process_timeout_s={timeout_s}")], "ddp", new_session=True)
    run.wait_until(lambda: newest_valid(checkpoints) >= 1, "the first checkpoint")
    workers = {}
    for child in psutil.Process(run.proc.pid).children(recursive=True):
        rank = child.environ().get("RANK")
        if rank is not None:
            workers[rank] = child
            run.children.append(child)
    assert sorted(workers) == ["0", "1"]
    victim, survivor = workers["1"], workers["0"]
    start = time.monotonic()
    if fault == "killed":
        victim.kill()
    else:
        victim.suspend()                                # alive but silent: only the timeout ends the wait

    def survivor_gone():
        try:
            return survivor.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    run.wait_until(survivor_gone, "rank 0 exiting")
    survivor_s = time.monotonic() - start
    assert survivor_s < timeout_s + 90, survivor_s
    if fault == "hung":
        assert survivor_s > timeout_s / 2, survivor_s   # it was the timeout that ended the wait
    print(f"rank 0 exited {survivor_s:.1f} s after rank 1 was {fault}")
    if fault == "hung":
        victim.kill()                                   # the launcher would wait 30 s for a stopped process
    assert run.finish(timeout=120) != 0

    latest = newest_valid(checkpoints)
    assert latest >= 1
    caplog.set_level(logging.INFO)
    train_unet.main(unet_args(stage2, out, "--resume", "latest", "--max-steps", str(latest + 2)))
    assert f"resumed from {checkpoints / f'step_{latest}'}" in caplog.text
    assert newest_valid(checkpoints) == latest + 2 and load_network(out / "unet_ema") is not None


# ----------------------------------------------------------------------------- 7. multi-process equivalence

# Two processes average the gradients of their half-batch means with an all-reduce; one process
# takes the mean over the whole batch. The sums run in another order, so the weights agree to
# float32 rounding: measured, 99.9% of them within 1.0e-7 and the largest difference 3.9e-5 -
# the same as one process run with 1 or with 2 threads (2.3e-5). The few larger differences
# are weights whose gradient is near zero, where Adam's g / (|g| + eps) magnifies rounding.
# A real mismatch (other samples, other noise) moves most weights by ~lr per step (1e-3).
EQUIVALENCE_Q999 = 1e-6
EQUIVALENCE_MAX = 4e-4      # a tenth of what 4 steps at lr 1e-3 can move a weight


def test_two_processes_with_half_batches_equal_one_process_with_the_whole_batch(shapes_dir, tmp_path, spawn):
    common = ["--max-steps", "4", "loss.disc_start=1000", "train.checkpoint_every=4"]
    run = spawn([*LAUNCH_2PROC, "train_vae.py",
                 *vae_args(shapes_dir, tmp_path / "two", *common, "train.batch_size=2")], "two_processes")
    train_vae.main(vae_args(shapes_dir, tmp_path / "one", *common, "train.batch_size=4"))
    assert run.finish() == 0, run.tail()
    assert "2 process(es), distributed type MULTI_CPU" in run.text()
    two, one = read_weights(tmp_path / "two" / "vae"), read_weights(tmp_path / "one" / "vae")
    assert two.keys() == one.keys()
    difference = np.concatenate([(two[k] - one[k]).abs().flatten().numpy() for k in one])
    q999, largest = np.quantile(difference, 0.999), difference.max()
    print(f"2 x batch 2 vs 1 x batch 4: 99.9% of weights within {q999:.1e}, largest difference {largest:.1e}")
    assert q999 <= EQUIVALENCE_Q999 and largest <= EQUIVALENCE_MAX, (q999, largest)
    # ... while training moved the weights far more than that.
    cfg = from_dict(VAERunConfig, json.loads((tmp_path / "one" / "config.json").read_text()))
    torch.manual_seed(cfg.train.seed)
    initial = AutoencoderKL(cfg.model).state_dict()
    moved = np.concatenate([(one[k] - v).abs().flatten().numpy() for k, v in initial.items()])
    assert np.median(moved) > 100 * EQUIVALENCE_Q999, np.median(moved)


# ----------------------------------------------------------------------------- bad input gaps

class Payload:
    """Unpickling this creates ``marker``: the proof that a file was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_weight_files_are_refused_without_being_unpickled(stage2, tmp_path):
    marker = tmp_path / "unpickled"
    evil = {"weight": Payload(marker)}
    for name in ("model.ckpt", "model.pt", "model.bin"):
        torch.save(evil, tmp_path / name)
        with pytest.raises(ModelFolderError, match="only .safetensors"):
            read_weights(tmp_path / name)
    with pytest.raises(ModelFolderError, match="only .safetensors"):
        load_vae(tmp_path / "model.ckpt")
    # A pickle under the safetensors name is not a readable safetensors file.
    unet = tmp_path / "unet"
    unet.mkdir()
    shutil.copy(stage2.reference / "unet_ema" / "config.json", unet / "config.json")
    torch.save(evil, unet / "model.safetensors")
    with pytest.raises(ModelFolderError, match="not a readable safetensors file"):
        load_network(unet)
    # A diffusers folder that only has the pickle weights.
    diffusers = tmp_path / "diffusers_vae"
    diffusers.mkdir()
    (diffusers / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    torch.save(evil, diffusers / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="only .safetensors is accepted"):
        load_vae(diffusers)
    assert not marker.exists()


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "optimizer.bin"])
def test_resume_never_runs_code_from_a_planted_checkpoint_file(planted, stage2, tmp_path, capsys):
    """Accelerate unpickles registered objects (custom_checkpoint_N.pkl) without restriction,
    so the step counters are JSON and nothing is registered; its other pickles are read with
    torch.load(weights_only=True), which refuses anything but tensors and plain containers."""
    out = tmp_path / "run"
    shutil.copytree(stage2.reference, out)
    checkpoint = out / "checkpoints" / f"step_{UNET_STEPS}"
    marker = tmp_path / "unpickled"
    torch.save({"step": Payload(marker)}, checkpoint / planted)
    # Whoever planted it also rewrote the manifest, so the size check passes.
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][planted] = {"size": (checkpoint / planted).stat().st_size,
                                  "sha256": sha256_file(checkpoint / planted)}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_unet.main, unet_args(stage2, out, "--resume", str(checkpoint), "--max-steps", "13"))
    assert exit_info.value.code == 2
    # Refused (an unpickling error, or Accelerate's count of registered objects), never run.
    assert f"error: cannot resume from {checkpoint}: " in capsys.readouterr().err
    assert not marker.exists()


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_20000_pixel_square_image_is_skipped_as_a_decompression_bomb(tmp_path, caplog):
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "good.png")
    (tmp_path / "huge.png").write_bytes(_png_header(20000, 20000))   # 400 Mpx, header only
    with caplog.at_level(logging.WARNING, logger="modules.data"):
        dataset = build_dataset(DataConfig(path=str(tmp_path), image_size=16, num_workers=0))
    assert len(dataset) == 1 and [Path(p).name for p in dataset.skipped_files] == ["huge.png"]
    assert "huge.png" in caplog.text and "decompression bomb" in caplog.text
