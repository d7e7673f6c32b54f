"""Reproduction tests for the outside attack's findings (issue 15: C1..C9, M1..M20, m1..m13).

Every test here FAILS on the code the issue was filed against and names the finding it
reproduces (test_c1_..., test_m12_..., test_minor_m1_...). The programs are driven only
through their command lines (train_vae.py, train_unet.py, sample.py, evaluate.py as
subprocesses), so the tests do not depend on how the modules are laid out. What a fix must give:

* a bad input or a refused action: exit code 2 and ONE line on stderr starting with
  ``error: `` that names the problem, and no Python traceback;
* otherwise: the work goes on (exit 0) and nothing is silently wrong.

Speed: one tiny VAE run and one tiny UNet run are shared by the module. The cases that are a
single command with nothing timed about them (most refusals) are declared with ``@quick``: they
are prepared and started on a background queue (one at a time) as soon as the shared runs
exist, while the tests that need signals, kills or several steps run in the foreground; their
tests then only check the finished result. So the module keeps two processes busy on 2 cores.

RELIABILITY.md has a row for each finding, naming its test here.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_DATASETS_OFFLINE": "1",
       "HF_HUB_OFFLINE": "1"}
TIMEOUT_S = 300       # bound on any one subprocess or wait; reached only when something is broken
POLL_S = 0.005
TINY = ["--config", "tiny", "--report-to", "none"]
VAE_STEPS = 30       # the shared runs of tests/conftest.py: tiny_vae_run has checkpoints/step_30,
UNET_STEPS = 6       # tiny_unet_run checkpoints/step_6
torch.set_num_threads(1)


# ----------------------------------------------------------------------------- running the programs

def cli(script: str, *args, env: dict | None = None, preexec_fn=None, timeout: float = TIMEOUT_S
        ) -> subprocess.CompletedProcess:
    """Run ``python SCRIPT ARGS`` in the repository root; stdout and stderr captured as text."""
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env or ENV,
                          capture_output=True, text=True, errors="replace", timeout=timeout,
                          preexec_fn=preexec_fn, stdin=subprocess.DEVNULL)


def spawn(script: str, *args, log: Path) -> subprocess.Popen:
    """Start ``python SCRIPT ARGS`` in the background, stdout and stderr into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_until(condition, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
               timeout: float = TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"exited with {proc.returncode} before {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(POLL_S)
    return found


def stop(proc: subprocess.Popen | None) -> None:
    """SIGKILL a process this test started (if still running) and reap it."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def show(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}; stderr tail:\n{res.stderr[-3000:]}\nstdout tail:\n{res.stdout[-1000:]}"


_TMP = re.compile(r"\S*pytest-of-[^/\s]+/pytest-[^/\s]+/[^/\s'\"]+")


def without_tmp(text: str) -> str:
    """``text`` with the pytest temporary folders (named after the tests) cut out of its paths,
    so a keyword is never found in a folder name."""
    return _TMP.sub("<tmp>", text)


def error_line(res: subprocess.CompletedProcess) -> str:
    """The one ``error: ...`` line a refusal ends with (asserts that shape)."""
    assert "Traceback" not in res.stderr, "a raw traceback instead of one line:\n" + show(res)
    assert res.returncode == 2, "expected exit code 2 (refused):\n" + show(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], "expected one final 'error: ' line:\n" + show(res)
    return errors[0]


def all_refused(results: dict, words: dict) -> None:
    """``refused(results[name], words[name])`` for every case; reports every case that fails."""
    problems = []
    for name, word in words.items():
        try:
            refused(results[name], word)
        except AssertionError as e:
            problems.append(f"--- {name}: {str(e)[:1500]}")
    assert not problems, "\n".join(problems)


def refused(res: subprocess.CompletedProcess, *words) -> str:
    """Exit 2, one ``error:`` line, no traceback; each of ``words`` (a string, or a tuple of
    alternatives) appears in that line, case-insensitively, outside the tests' tmp folders."""
    line = error_line(res)
    text = without_tmp(line).lower()
    for word in words:
        options = (word,) if isinstance(word, str) else word
        assert any(o.lower() in text for o in options), f"{line!r} does not mention {' or '.join(options)}"
    return line


def succeeded(res: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in res.stderr and res.returncode == 0, "expected exit 0:\n" + show(res)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_state(folder: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under ``folder`` (empty if absent)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def rlimit_fsize(limit: int):
    """preexec_fn: files may not grow past ``limit`` bytes (EFBIG, as a full disk gives ENOSPC)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def vae_args(data: Path, out: Path, *extra) -> list:
    return [*TINY, "--data", data, "--output-dir", out, "--max-steps", VAE_STEPS, "train.checkpoint_every=2",
            "train.val_every=1000", "train.image_log_every=1000", "scale_samples=8", *extra]


def unet_args(data: Path, vae: Path, out: Path, cache: Path, *extra) -> list:
    return [*TINY, "--data", data, "--vae", vae, "--output-dir", out, "--max-steps", UNET_STEPS,
            "train.checkpoint_every=2", "train.image_log_every=1000", "sample.num_images=2",
            f"cache_dir={cache}", *extra]


def copy_images(src: Path, dst: Path, n: int) -> list[Path]:
    """The first ``n`` PNGs of the shapes set (from all classes), copied flat into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(src.glob("*/*.png"), key=lambda p: p.name)[:n]:
        shutil.copy(f, dst / f.name)
        out.append(dst / f.name)
    return out


def export_copy(unet_run: Path, dst: Path, edit=None) -> Path:
    """A copy of the run's ``unet_ema`` export, its config.json passed through ``edit``."""
    shutil.copytree(unet_run / "unet_ema", dst)
    if edit is not None:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


# ----------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("attack")


@pytest.fixture(scope="module")
def ctx(work, shapes_dir, tiny_vae_run, tiny_unet_run) -> SimpleNamespace:
    """The session's shared runs (tests/conftest.py), never written into by a test: ``shapes``
    (24 images, 32 px, class folders, masks via metadata.jsonl), ``vae`` (a tiny VAE run,
    checkpoints/step_30, export vae/), ``unet`` (a class-conditional tiny shortcut UNet on it,
    M = 8, checkpoints/step_6) and its latent cache ``cache``."""
    return SimpleNamespace(work=work, shapes=shapes_dir, vae=tiny_vae_run, unet=tiny_unet_run,
                           cache=tiny_unet_run.parent / "latent_cache")


QUICK: dict[str, Callable] = {}


def quick(key: str):
    """Declare a background case: ``prepare(ctx, folder)`` writes its inputs under ``folder``
    and returns {name: zero-argument callable giving a CompletedProcess}."""
    def register(prepare):
        QUICK[key] = prepare
        return prepare
    return register


@pytest.fixture(scope="module", autouse=True)
def background(ctx, request):
    """Starts the selected @quick cases (case ``key`` belongs to ``test_<key>_...``) on a
    one-worker queue as soon as the shared runs exist."""
    selected = {item.name for item in request.session.items}
    pool = ThreadPoolExecutor(max_workers=1)
    cases = {}
    for key, prepare in QUICK.items():
        if not any(name.startswith(f"test_{key}_") for name in selected):
            continue
        folder = ctx.work / f"quick_{key}"
        folder.mkdir()
        commands = prepare(ctx, folder)
        cases[key] = (folder, {name: pool.submit(run) for name, run in commands.items()})

    def result(key: str):
        folder, futures = cases[key]
        return folder, {name: f.result(timeout=TIMEOUT_S * 2) for name, f in futures.items()}

    yield result
    pool.shutdown(wait=True, cancel_futures=True)


# ============================================================================= critical

class MarkerWriter(torch.nn.Module):
    """A TorchScript 'Inception' that writes a file when it is loaded and when it is called."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.marker = state[0]
        self.training = state[1]
        torch.save([1], self.marker + "_at_load")

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        torch.save([2], self.marker + "_at_forward")
        return x.flatten(1)[:, :8]


@quick("c1")
def _c1(ctx, folder):
    crafted = folder / "crafted_inception.pt"
    torch.jit.script(MarkerWriter(str(folder / "marker"))).save(str(crafted))
    return {"fid": functools.partial(cli, "evaluate.py", "fid", "--inception", crafted, "--image-size", 8,
                                     "--workers", 1, "--batch-size", 8, ctx.shapes / "circle", ctx.shapes / "square")}


def test_c1_inception_file_that_is_not_the_known_one_is_refused_without_running_it(background):
    folder, res = background("c1")
    ran = sorted(p.name for p in folder.glob("marker*"))
    assert not ran, f"the crafted TorchScript ran code ({ran} written); " + show(res["fid"])
    refused(res["fid"], ("sha256", "sha-256"))


def test_c2_bad_sample_steps_is_refused_before_any_training(ctx, tmp_path):
    out = tmp_path / "run"
    res = cli("train_unet.py", *unet_args(ctx.shapes, ctx.vae, out, ctx.cache, "cond.type=class",
                                          "sample.steps=1,3", "train.image_log_every=2"))
    refused(res, "sample.steps")
    assert not list((out / "checkpoints").glob("*")), "training started before the option was checked"


def test_c3_resume_with_another_vae_is_refused(ctx, tmp_path):
    run = tmp_path / "unet"
    shutil.copytree(ctx.unet, run)
    other = tmp_path / "vae_trained_further"
    shutil.copytree(ctx.vae / "vae", other)
    weights = load_file(str(other / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name] + 0.05
    save_file(weights, str(other / "model.safetensors"))
    config = json.loads((other / "config.json").read_text())
    config["model"]["scale_factor"] *= 0.66          # what training the VAE further did (0.404 -> 0.266)
    (other / "config.json").write_text(json.dumps(config))
    res = cli("train_unet.py", *unet_args(ctx.shapes, other, run, tmp_path / "cache", "cond.type=class"),
              "--resume", "latest", "--max-steps", UNET_STEPS + 2)
    refused(res, "vae")


@quick("c4")
def _c4(ctx, folder):
    # A fresh output dir: nothing there to compare with, only the checkpoint itself.
    return {"resume": functools.partial(
        cli, "train_unet.py", *unet_args(ctx.shapes, ctx.vae, folder / "fresh", ctx.cache, "cond.type=class",
                                         "model.dropout=0.1"),
        "--resume", ctx.unet / "checkpoints" / f"step_{UNET_STEPS}", "--max-steps", UNET_STEPS + 2)}


def test_c4_resume_path_is_checked_against_the_checkpoints_own_model_config(background):
    _, res = background("c4")
    refused(res["resume"], "dropout")


def test_c5_second_run_on_a_dir_in_use_is_refused_and_a_stale_lock_does_not_block(ctx, tmp_path):
    out = tmp_path / "run"
    never = ["--max-steps", 100000, "train.checkpoint_every=100000", "train.val_every=100000",
             "train.image_log_every=100000"]
    first = spawn("train_vae.py", *TINY, "--data", ctx.shapes, "--output-dir", out, *never, log=tmp_path / "first.log")
    try:
        wait_until(lambda: (out / "config.json").is_file(), "the first run's config.json", first,
                   tmp_path / "first.log")
        time.sleep(0.5)
        second = cli("train_vae.py", *vae_args(ctx.shapes, out, "--max-steps", 2))
        assert first.poll() is None, "the first run ended early"
        refused(second, ("lock", "in use", "running", "another run"))
    finally:
        stop(first)                         # SIGKILL: whatever lock it held is now stale
    succeeded(cli("train_vae.py", *vae_args(ctx.shapes, out, "--max-steps", 2), "--resume", "latest"))


@quick("c6")
def _c6(ctx, folder):
    out = folder / "vae"
    shutil.copytree(ctx.vae, out)
    shutil.rmtree(out / "checkpoints")      # a normal clean-up once a run is done
    (folder / "before.sha256").write_text(sha256(out / "vae" / "model.safetensors"))
    return {"new_run": functools.partial(cli, "train_vae.py", *vae_args(ctx.shapes, out, "--max-steps", 2))}


def test_c6_finished_exports_are_not_overwritten_by_a_new_run(background):
    folder, res = background("c6")
    assert sha256(folder / "vae" / "vae" / "model.safetensors") == (folder / "before.sha256").read_text(), \
        "the finished export was replaced; " + show(res["new_run"])
    refused(res["new_run"])


def _bmp_folder(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` 32x32 BMPs (a fixed file size whatever the content)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        colour = rng.integers(0, 256, size=3)
        pixels = np.broadcast_to(colour, (32, 32, 3)).astype(np.uint8).copy()
        pixels[8:24, 8:24] = 255 - colour
        Image.fromarray(pixels).save(folder / f"img{i}.bmp")
        files.append(folder / f"img{i}.bmp")
    return files


def test_c7_a_replaced_image_of_the_same_size_and_mtime_gets_fresh_latents(ctx, tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    files = _bmp_folder(data, 8, seed=0)
    args = [*TINY, "--data", data, "--vae", ctx.vae, "--max-steps", 1, f"cache_dir={cache}",
            "train.image_log_every=1000", "sample.num_images=1"]
    succeeded(cli("train_unet.py", *args, "--output-dir", tmp_path / "r1"))
    # Replace one image by a different one of the same size and mtime (cp -p, rsync -a, tar).
    victim = files[0]
    st = victim.stat()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(victim)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    before = tree_state(cache)
    succeeded(cli("train_unet.py", *args, "--output-dir", tmp_path / "r2"))
    assert tree_state(cache) != before, "the old latents were reused for the changed image"


def test_c8_symlinked_class_folders_are_not_skipped(ctx, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(ctx.shapes / "circle", data / "circle")
    (data / "square").symlink_to(ctx.shapes / "square", target_is_directory=True)
    (data / "triangle").symlink_to(ctx.shapes / "triangle", target_is_directory=True)
    out = tmp_path / "run"
    res = cli("train_unet.py", *TINY, "--data", data, "--vae", ctx.vae, "--output-dir", out, "--max-steps", 1,
              "cond.type=class", f"cache_dir={tmp_path / 'cache'}", "train.image_log_every=1000",
              "sample.num_images=1")
    if res.returncode == 2 and "symlink" in without_tmp(res.stderr).lower():
        refused(res, "symlink")             # refusing, naming the links, is fine too
        return
    succeeded(res)
    config = json.loads((out / "unet_ema" / "config.json").read_text())
    assert config["sizes"]["num_classes"] == 3, f"trained on {config['sizes']['num_classes']} class(es), not 3"


@quick("c9")
def _c9(ctx, folder):
    outside = copy_images(ctx.shapes, folder / "outside", 1)[0]
    runs = {}
    for case, name in (("climbing", f"../outside/{outside.name}"), ("absolute", str(outside))):
        root = folder / case
        inside = copy_images(ctx.shapes, root / "imgs", 7)
        rows = [{"file_name": f"imgs/{p.name}"} for p in inside] + [{"file_name": name}]
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[case] = functools.partial(cli, "train_vae.py", *vae_args(root, folder / f"run_{case}", "--max-steps", 1))
    return runs


def test_c9_metadata_paths_outside_the_data_folder_are_refused(background):
    _, res = background("c9")
    refused(res["climbing"], ("outside", "../"))
    refused(res["absolute"], ("outside", "absolute"))


# ============================================================================= major

def _array(cache: Path) -> Path:
    return next(cache.glob("store_*/shard_00000/mean.npy"))


M1_DAMAGE = {   # what is done to a copy of the shared store, and what the rebuild must say
    "array_overwritten_with_0xff": (lambda c: _array(c).write_bytes(b"\xff" * _array(c).stat().st_size),
                                    "shard shard_00000: mean.npy is not a readable array"),
    "array_truncated": (lambda c: os.truncate(_array(c), _array(c).stat().st_size // 2),
                        "shard shard_00000: file mean.npy has"),
    "array_deleted": (lambda c: _array(c).unlink(), "shard shard_00000: missing file mean.npy"),
    "index_truncated": (lambda c: os.truncate(next(c.glob("store_*/index.json")), 40), "unreadable index.json"),
    "rows_junk": (lambda c: next(c.glob("store_*/shard_00000/rows.json")).write_text("junk{"),
                  "shard shard_00000: file rows.json has"),
}


@quick("m1")
def _m1(ctx, folder):
    runs = {}
    for kind, (damage, _) in M1_DAMAGE.items():
        cache = folder / f"cache_{kind}"
        shutil.copytree(ctx.cache, cache)
        damage(cache)
        runs[kind] = functools.partial(cli, "train_unet.py", *unet_args(ctx.shapes, ctx.vae, folder / f"run_{kind}",
                                                                       cache, "cond.type=class", "--max-steps", 1))
    return runs


@pytest.mark.parametrize("kind", sorted(M1_DAMAGE))
def test_m1_a_damaged_latent_store_is_rebuilt(ctx, background, kind):
    folder, res = background("m1")
    succeeded(res[kind])
    why = M1_DAMAGE[kind][1]
    assert re.search(rf"encoding latent store \S+ \(.*{re.escape(why)}", res[kind].stderr), \
        f"no log line saying the store is encoded again because of '{why}':\n{res[kind].stderr[-2000:]}"
    # Rebuilt to exactly the latents of the undamaged store (no NaN, nothing stale).
    original = json.loads(next(ctx.cache.glob("store_*/index.json")).read_text())
    rebuilt = json.loads(next((folder / f"cache_{kind}").glob("store_*/index.json")).read_text())
    assert rebuilt["shards"] == original["shards"] and rebuilt["spec"] == original["spec"]


def test_m2_two_runs_building_one_cache_at_once_both_succeed(ctx, tmp_path):
    cache = tmp_path / "cache"
    args = [*TINY, "--data", ctx.shapes, "--vae", ctx.vae, "--max-steps", 1, f"cache_dir={cache}",
            "train.image_log_every=1000", "sample.num_images=1"]
    first = spawn("train_unet.py", *args, "--output-dir", tmp_path / "a", log=tmp_path / "a.log")
    second = None
    try:
        # Freeze the first builder as soon as it has started writing the cache.
        wait_until(lambda: cache.is_dir() and any(cache.iterdir()), "the first cache build", first,
                   tmp_path / "a.log")
        os.kill(first.pid, signal.SIGSTOP)
        second = spawn("train_unet.py", *args, "--output-dir", tmp_path / "b", log=tmp_path / "b.log")
        # Let the second run reach the cache (today it builds it, with a lock it waits), then thaw the first.
        started, reached = time.monotonic(), None
        while second.poll() is None and time.monotonic() - started < 30:
            if reached is None and "cache" in without_tmp((tmp_path / "b.log").read_text(errors="replace")):
                reached = time.monotonic()
            if reached is not None and time.monotonic() - reached > 3:
                break
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGCONT)
        first.wait(timeout=TIMEOUT_S)
        second.wait(timeout=TIMEOUT_S)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        stop(first)
        stop(second)
    for name, proc in (("a", first), ("b", second)):
        log = (tmp_path / f"{name}.log").read_text(errors="replace")
        assert proc.returncode == 0 and "Traceback" not in log, f"run {name} exited {proc.returncode}:\n{log[-3000:]}"
    leftovers = [p.name for p in cache.iterdir() if p.name.endswith((".tmp", ".shards"))]
    assert not leftovers, leftovers


def test_m3_disk_full_while_building_the_cache_is_one_line_and_leaves_no_half_folders(ctx, tmp_path):
    cache = tmp_path / "cache"
    res = cli("train_unet.py", *TINY, "--data", ctx.shapes, "--vae", ctx.vae, "--output-dir", tmp_path / "run",
              "--max-steps", 1, f"cache_dir={cache}", preexec_fn=rlimit_fsize(2 * 1024))
    refused(res, "could not write the latent store")
    # A store keeps its complete shards for the next run to continue (issue 22), but nothing half-written and
    # nothing a run could take for a finished store: no temporary shard, no index.
    half = [str(p.relative_to(cache)) for p in cache.rglob("*.tmp")] if cache.exists() else []
    finished = list(cache.glob("store_*/index.json")) if cache.exists() else []
    assert not half and not finished, f"half-written parts of the store left: {half}, {finished}"


def test_m4_a_failed_sample_grid_write_is_one_line_and_loses_no_steps(ctx, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "images").write_text("not a folder")   # the grid cannot be written, as on a full disk
    res = cli("train_vae.py", *TINY, "--data", ctx.shapes, "--output-dir", out, "--max-steps", 2,
              "train.checkpoint_every=1000", "train.val_every=1", "train.image_log_every=1", "scale_samples=8")
    assert "Traceback" not in res.stderr, show(res)
    if res.returncode != 0:
        error_line(res)
    assert list((out / "checkpoints").glob("step_*")), "the steps done were not checkpointed; " + show(res)


@quick("m5")
def _m5(ctx, folder):
    out = folder / "vae"
    shutil.copytree(ctx.vae, out)
    shutil.copytree(out / "checkpoints" / f"step_{VAE_STEPS}", out / "checkpoints" / f"step_{VAE_STEPS}_bak")
    shutil.copytree(out / "checkpoints" / f"step_{VAE_STEPS}", out / "checkpoints" / f"step_{VAE_STEPS} copy")
    return {"resume": functools.partial(cli, "train_vae.py", *vae_args(ctx.shapes, out, "--max-steps", VAE_STEPS + 2),
                                        "--resume", "latest")}


def test_m5_a_copied_checkpoint_folder_does_not_crash_resume(background):
    _, res = background("m5")
    succeeded(res["resume"])


def test_m6_stage2_skips_a_dangling_symlink_like_stage1(ctx, tmp_path):
    data = tmp_path / "data"
    copy_images(ctx.shapes, data / "imgs", 8)
    (data / "imgs" / "broken.png").symlink_to(tmp_path / "does_not_exist.png")
    succeeded(cli("train_unet.py", *TINY, "--data", data, "--vae", ctx.vae, "--output-dir", tmp_path / "run",
                  "--max-steps", 1, f"cache_dir={tmp_path / 'cache'}", "train.image_log_every=1000",
                  "sample.num_images=1"))


@quick("m6")
def _m6(ctx, folder):
    loop = folder / "loop" / "imgs"
    copy_images(ctx.shapes, loop, 8)
    (loop / "a.png").symlink_to(loop / "b.png")           # a file link loop
    (loop / "b.png").symlink_to(loop / "a.png")
    (loop / "self.png").symlink_to(loop / "self.png")
    (loop / "up").symlink_to(loop.parent, target_is_directory=True)     # a folder link loop
    odd = folder / "non_utf8" / "imgs"
    first = copy_images(ctx.shapes, odd, 8)[0]
    os.rename(first, os.path.join(os.fsencode(odd), b"caf\xe9.png"))     # Latin-1 bytes: not UTF-8
    return {name: functools.partial(cli, "train_unet.py", *TINY, "--data", folder / name, "--vae", ctx.vae,
                                    "--output-dir", folder / f"run_{name}", "--max-steps", 1,
                                    f"cache_dir={folder / f'cache_{name}'}", "train.image_log_every=1000",
                                    "sample.num_images=1")
            for name in ("loop", "non_utf8")}


def test_m6_stage2_trains_past_link_loops_and_a_non_utf8_name(background):
    folder, res = background("m6")
    for name in ("loop", "non_utf8"):
        succeeded(res[name])
        spec = json.loads(next((folder / f"cache_{name}").glob("store_*/index.json")).read_text())["spec"]
        assert spec["num_rows"] == 8, (name, spec["num_rows"])     # the loops left out, the odd name kept


@quick("m7")
def _m7(ctx, folder):
    blocker = folder / "a_file"
    blocker.write_text("x")
    return {"train": functools.partial(cli, "train_unet.py", *TINY, "--data", ctx.shapes, "--vae", ctx.vae,
                                       "--output-dir", blocker / "run", "--max-steps", 1)}


def test_m7_stage2_output_dir_that_cannot_be_created_is_one_line(background):
    folder, res = background("m7")
    assert str(folder / "a_file") in refused(res["train"])


M8_OUTS = {"existing_file": "a_file", "under_a_file": "a_file/samples", "proc": "/proc/ldm_samples"}


@quick("m8")
def _m8(ctx, folder):
    (folder / "a_file").write_text("x")
    return {name: functools.partial(cli, "sample.py", "--unet", ctx.unet, "--out", folder / out, "--num-samples", 1)
            for name, out in M8_OUTS.items()}


def test_m8_sample_out_that_is_an_existing_file_is_one_line(background):
    folder, res = background("m8")
    assert str(folder / "a_file") in refused(res["existing_file"])


def test_m8_sample_out_under_a_file_or_in_proc_is_one_line(background):
    folder, res = background("m8")
    assert str(folder / "a_file" / "samples") in refused(res["under_a_file"])
    assert "/proc/ldm_samples" in refused(res["proc"])


def test_m8_disk_full_mid_run_leaves_a_manifest_of_exactly_the_complete_pngs(ctx, tmp_path):
    args = ["--unet", ctx.unet, "--num-samples", 12, "--batch-size", 4]
    succeeded(cli("sample.py", *args, "--out", tmp_path / "whole"))
    sizes = [(tmp_path / "whole" / f"{i:06d}.png").stat().st_size for i in range(12)]
    # Files may not grow past the largest of the first few PNGs: a later, larger one fails (EFBIG, as
    # ENOSPC on a full disk), mid-batch; the smaller manifest and its lines still fit.
    limit, failing = next((max(sizes[:k]), i) for k in range(4, 0, -1)
                          for i in range(k, 12) if sizes[i] > max(sizes[:k]))
    out = tmp_path / "cut"
    res = cli("sample.py", *args, "--out", out, preexec_fn=rlimit_fsize(limit))
    assert str(out) in refused(res, "file too large")
    listed = [json.loads(line)["file"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert listed == [f"{i:06d}.png" for i in range(failing)], (listed, failing)
    claim = [".ldm-output.json", ".lock"]     # the folder's claim (modules/durable.py claim_output)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(listed + ["manifest.jsonl", "request.json"]
                                                                            + claim)
    for name in listed:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    # evaluate.py refuses the incomplete folder; the same command again completes it.
    stats = tmp_path / "unused.npz"
    np.savez(stats, mu=np.zeros(8), sigma=np.eye(8))
    refused(cli("evaluate.py", "fid", "--inception", tmp_path / "not_needed.pt", out, stats), "of the 12")
    succeeded(cli("sample.py", *args, "--out", out))
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "whole" / "manifest.jsonl").read_text()
    for i in range(12):     # made in other batches now: equal within the 2/255 of sample.py's contract
        assert np.abs(read_png(out / f"{i:06d}.png") - read_png(tmp_path / "whole" / f"{i:06d}.png")).max() <= 2, i


def test_m9_an_interrupted_overwrite_does_not_leave_a_manifest_that_lies(ctx, tmp_path):
    out, log = tmp_path / "samples" / "s", tmp_path / "overwrite.log"
    succeeded(cli("sample.py", "--unet", ctx.unet, "--out", out, "--num-samples", 48, "--batch-size", 48))
    old_manifest = {r["file"]: r for r in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}
    old_bytes = {name: (out / name).read_bytes() for name in old_manifest}
    first = out / "000000.png"
    first_mtime = first.stat().st_mtime_ns

    def entries():
        return set(os.listdir(out.parent)) | set(os.listdir(out))

    before = entries()
    proc = spawn("sample.py", "--unet", ctx.unet, "--out", out, "--num-samples", 48, "--batch-size", 1,
                 "--steps", 8, "--seed", 1, "--overwrite", log=log)
    try:   # SIGKILL as soon as the overwrite has written something
        wait_until(lambda: proc.poll() is not None or entries() != before
                   or (first.exists() and first.stat().st_mtime_ns != first_mtime), "the overwrite to start")
    finally:
        stop(proc)
    assert proc.returncode != 0, "the overwrite finished before it could be interrupted; give it more images"
    manifest = out / "manifest.jsonl"
    if not manifest.exists():
        return
    for record in map(json.loads, manifest.read_text().splitlines()):
        name = record["file"]
        is_old = (out / name).is_file() and (out / name).read_bytes() == old_bytes.get(name)
        assert is_old == (record == old_manifest.get(name)), \
            f"manifest.jsonl describes {name} as {record}, but the file holds {'old' if is_old else 'new'} pixels"


@quick("m11")
def _m11(ctx, folder):
    return {value: functools.partial(cli, "sample.py", "--unet", ctx.unet, "--out", folder / f"s_{value}",
                                     "--num-samples", 1, f"--cfg-scale={value}") for value in ("nan", "inf", "-inf")}


def test_m11_sample_cfg_scale_nan_or_inf_is_refused(background):
    _, res = background("m11")
    all_refused(res, {value: "cfg" for value in ("nan", "inf", "-inf")})


M12_EDITS = {
    "objective": lambda c: c.pop("objective"),
    "latent_size": lambda c: c.update(latent_size=-4),
    "vae": lambda c: c.update(vae="somewhere"),
}


@quick("m12")
def _m12(ctx, folder):
    return {key: functools.partial(cli, "sample.py", "--unet", export_copy(ctx.unet, folder / f"edited_{key}", edit),
                                   "--out", folder / f"out_{key}", "--num-samples", 1)
            for key, edit in M12_EDITS.items()}


def test_m12_an_edited_export_config_is_refused_naming_the_key(background):
    _, res = background("m12")
    all_refused(res, {key: key for key in M12_EDITS})


@quick("m13")
def _m13(ctx, folder):
    edited = export_copy(ctx.unet, folder / "edited_unet")
    weights = load_file(str(edited / "model.safetensors"))
    name = next(k for k, v in weights.items() if v.is_floating_point() and v.numel() > 1)
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(edited / "model.safetensors"))
    return {"sample": functools.partial(cli, "sample.py", "--unet", edited, "--out", folder / "s", "--num-samples", 1)}


def test_m13_a_nan_weight_in_the_export_is_not_silent(background):
    _, res = background("m13")
    res = res["sample"]
    if res.returncode == 0:                 # a warning is fine too, silence is not
        assert "Traceback" not in res.stderr
        assert re.search(r"\bnan\b|non-finite|not finite", without_tmp(res.stderr).lower()), \
            "all-black images from a NaN weight, without a word; " + show(res)
    else:
        refused(res, ("nan", "finite"))


M14_STATS = ("with_inf.npz", "with_nan.npz", "negative_sigma.npz")


class FlatFeatures(torch.nn.Module):
    """A harmless stand-in extractor (mean colour), so evaluate.py reaches the images."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))


@quick("m14")
def _m14(ctx, folder):
    d = 8
    np.savez(folder / "with_inf.npz", mu=np.full(d, np.inf), sigma=np.eye(d))
    np.savez(folder / "with_nan.npz", mu=np.zeros(d), sigma=np.where(np.eye(d) > 0, np.nan, 0.0))
    np.savez(folder / "negative_sigma.npz", mu=np.zeros(d), sigma=-np.eye(d))
    # The reference statistics are read before any extractor: no Inception file is needed.
    runs = {name: functools.partial(cli, "evaluate.py", "fid", "--inception", folder / "not_needed.pt",
                                    ctx.shapes / "circle", folder / name) for name in M14_STATS}
    images = folder / "with_a_bomb"
    copy_images(ctx.shapes, images, 4)
    (images / "zz_bomb.png").write_bytes(png_header(20000, 20000))       # 400 Mpx, header only
    extractor = folder / "flat.pt"
    torch.jit.script(FlatFeatures()).save(str(extractor))
    runs["bomb"] = functools.partial(cli, "evaluate.py", "fid", "--inception", extractor, "--inception-sha256",
                                     sha256(extractor), "--image-size", 8, "--workers", 1, images, ctx.shapes)
    return runs


def png_header(width: int, height: int) -> bytes:
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_m14_a_reference_npz_with_inf_or_negative_sigma_is_refused(background):
    _, res = background("m14")
    all_refused(res, {name: name for name in M14_STATS})


def test_m14_a_decompression_bomb_given_to_evaluate_is_one_line(background):
    _, res = background("m14")
    refused(res["bomb"], "zz_bomb.png", "decompression")


@quick("m15")
def _m15(ctx, folder):
    (folder / "list.json").write_text("[1, 2]")
    resumed = folder / "resumed"
    resumed.mkdir()
    (resumed / "config.json").write_text('{"model": {"base_ch')        # truncated
    return {
        "list": functools.partial(cli, "train_vae.py", "--config", folder / "list.json", "--data", ctx.shapes,
                                  "--output-dir", folder / "run", "--report-to", "none", "--max-steps", 1),
        "truncated": functools.partial(cli, "train_vae.py", *vae_args(ctx.shapes, resumed, "--max-steps", 1),
                                       "--resume", "latest"),
    }


def test_m15_a_config_file_that_is_not_a_json_object_is_one_line(background):
    _, res = background("m15")
    refused(res["list"], "list.json")
    # A damaged config.json of the output dir, with --config given: replaced, and said so.
    succeeded(res["truncated"])
    assert re.search(r"WARNING .*config\.json.*invalid JSON.*replaced", res["truncated"].stderr)


@quick("m16")
def _m16(ctx, folder):
    root = folder / "data"
    rows = [{"file_name": p.name} for p in copy_images(ctx.shapes, root, 6)] + [{"file_name": 12}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"train": functools.partial(cli, "train_vae.py", *vae_args(root, folder / "run", "--max-steps", 1))}


def test_m16_metadata_file_name_of_the_wrong_type_is_one_line(background):
    _, res = background("m16")
    refused(res["train"], "file_name")


@quick("m17")
def _m17(ctx, folder):
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(folder), WANDB_CONFIG_DIR=str(folder / "wandb_config"), NETRC=str(folder / "netrc"))
    return {"train": functools.partial(cli, "train_vae.py", "--config", "tiny", "--data", ctx.shapes, "--output-dir",
                                       folder / "run", "--report-to", "wandb", "--max-steps", 1, env=env, timeout=120)}


def test_m17_wandb_without_an_api_key_is_refused_at_start_up(background):
    folder, res = background("m17")
    refused(res["train"], ("WANDB_MODE", "--report-to"))
    assert not list((folder / "run" / "checkpoints").glob("*"))


def test_m18_data_vanishing_mid_run_checkpoints_the_good_weights_first(ctx, tmp_path):
    data, out, log = tmp_path / "data", tmp_path / "run", tmp_path / "run.log"
    shutil.copytree(ctx.shapes, data)
    proc = spawn("train_vae.py", *TINY, "--data", data, "--output-dir", out, "--max-steps", 100000,
                 "train.checkpoint_every=100000", "train.val_every=2", "train.image_log_every=2", "scale_samples=8",
                 log=log)
    try:
        wait_until(lambda: (out / "images").is_dir() and any((out / "images").iterdir()), "the first image grid",
                   proc, log)
        shutil.rmtree(data)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    assert list((out / "checkpoints").glob("step_*")), \
        f"exited {proc.returncode} without saving the good weights:\n{text[-2000:]}"


def test_m19_resume_after_the_data_changed_is_not_silent(ctx, tmp_path):
    out, changed = tmp_path / "vae", tmp_path / "data"
    shutil.copytree(ctx.vae, out)
    shutil.copytree(ctx.shapes, changed)
    for f in sorted(changed.glob("*/*.png"))[:4]:
        f.unlink()
    (changed / "metadata.jsonl").unlink()
    res = cli("train_vae.py", *vae_args(changed, out, "--max-steps", VAE_STEPS + 2), "--resume", "latest")
    if res.returncode == 2:
        refused(res, "data")
        return
    succeeded(res)
    warnings = [line for line in without_tmp(res.stderr).splitlines() if "WARNING" in line and "data" in line.lower()]
    assert warnings, "the run continued on other data without a word; " + show(res)


def test_m20_continuing_a_vae_run_keeps_the_vae_a_unet_was_trained_on(ctx, tmp_path):
    vae, unet = tmp_path / "vae", tmp_path / "unet"
    shutil.copytree(ctx.vae, vae)
    # The same VAE weights and data as the shared runs, so their latent cache is reused.
    succeeded(cli("train_unet.py", *unet_args(ctx.shapes, vae, unet, ctx.cache, "--max-steps", 1)))
    more = cli("train_vae.py", *vae_args(ctx.shapes, vae, "--max-steps", VAE_STEPS + 2), "--resume", "latest")
    if more.returncode == 2:
        error_line(more)                    # refusing to change a VAE in use is fine too
        return
    succeeded(more)
    succeeded(cli("sample.py", "--unet", unet, "--out", tmp_path / "s", "--num-samples", 1))


# ============================================================================= minor

M1_SEEDS = (0, 2 ** 32, 2 ** 70)


@quick("minor_m1")
def _minor_m1(ctx, folder):
    return {seed: functools.partial(cli, "sample.py", "--unet", ctx.unet, "--out", folder / f"seed{seed}",
                                    "--num-samples", 1, "--seed", seed) for seed in M1_SEEDS}


def test_minor_m1_seeds_differing_only_in_high_bits_give_different_images(background):
    folder, res = background("minor_m1")
    for seed in M1_SEEDS:
        succeeded(res[seed])
    images = {seed: read_png(folder / f"seed{seed}" / "000000.png") for seed in M1_SEEDS}
    for i, a in enumerate(M1_SEEDS):
        for b in M1_SEEDS[i + 1:]:
            assert np.abs(images[a] - images[b]).max() > 2, f"--seed {a} and --seed {b} give the same image"


@quick("minor_m2")
def _minor_m2(ctx, folder):
    return {"sample": functools.partial(cli, "sample.py", "--unet", ctx.unet, "--out", folder / "s",
                                        "--num-samples", 1, "--device", "foo")}


def test_minor_m2_unknown_device_is_one_line(background):
    _, res = background("minor_m2")
    refused(res["sample"], "foo")


@quick("minor_m4")
def _minor_m4(ctx, folder):
    # A stage-1 checkpoint resumed by stage 2.
    return {"resume": functools.partial(
        cli, "train_unet.py", *unet_args(ctx.shapes, ctx.vae, folder / "run", ctx.cache),
        "--resume", ctx.vae / "checkpoints" / f"step_{VAE_STEPS}")}


def test_minor_m4_a_vae_checkpoint_given_to_train_unet_is_one_short_line(background):
    _, res = background("minor_m4")
    line = refused(res["resume"])
    assert len(line) < 600, f"a {len(line)}-character error line"


@quick("minor_m5")
def _minor_m5(ctx, folder):
    root = folder / "data"
    text = "file_name\n" + "".join(f"{p.name}\n" for p in copy_images(ctx.shapes, root, 8))
    (root / "metadata.csv").write_bytes(text.encode("utf-8-sig"))
    return {"train": functools.partial(cli, "train_vae.py", *vae_args(root, folder / "run", "--max-steps", 1,
                                                                       "data.num_val_images=2"))}


def test_minor_m5_a_metadata_csv_with_a_bom_is_read(background):
    _, res = background("minor_m5")
    succeeded(res["train"])


@quick("minor_m6")
def _minor_m6(ctx, folder):
    edited = export_copy(ctx.unet, folder / "edited", lambda c: c["shortcut"].update(denoise_timesteps=3))
    return {"sample": functools.partial(cli, "sample.py", "--unet", edited, "--out", folder / "s", "--num-samples", 1)}


def test_minor_m6_an_export_denoise_timesteps_not_a_power_of_two_is_refused(background):
    _, res = background("minor_m6")
    refused(res["sample"], ("denoise_timesteps", "power of two"))


@quick("minor_m8")
def _minor_m8(ctx, folder):
    return {"train": functools.partial(cli, "train_vae.py", *vae_args(ctx.shapes, folder / ("x" * 300),
                                                                       "--max-steps", 1))}


def test_minor_m8_an_output_dir_name_over_255_characters_is_one_line(background):
    _, res = background("minor_m8")
    refused(res["train"])


def test_minor_m9_sighup_saves_a_checkpoint_like_sigterm(ctx, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = spawn("train_vae.py", *TINY, "--data", ctx.shapes, "--output-dir", out, "--max-steps", 100000,
                 "train.checkpoint_every=100000", "train.val_every=2", "train.image_log_every=2", "scale_samples=8",
                 log=log)
    try:
        wait_until(lambda: (out / "images").is_dir() and any((out / "images").iterdir()), "the first image grid",
                   proc, log)
        proc.send_signal(signal.SIGHUP)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, f"SIGHUP: exit {proc.returncode}:\n{text[-2000:]}"
    assert list((out / "checkpoints").glob("step_*")), "no checkpoint saved on SIGHUP"


MLFLOW_INSTALLED = importlib.util.find_spec("mlflow") is not None


@quick("minor_m10")
def _minor_m10(ctx, folder):
    if MLFLOW_INSTALLED:
        return {}
    return {"train": functools.partial(cli, "train_vae.py", "--config", "tiny", "--data", ctx.shapes, "--output-dir",
                                       folder / "run", "--report-to", "mlflow", "--max-steps", 1)}


@pytest.mark.skipif(MLFLOW_INSTALLED, reason="mlflow is installed")
def test_minor_m10_report_to_mlflow_without_mlflow_is_refused_at_start_up(background):
    folder, res = background("minor_m10")
    refused(res["train"], "mlflow")
    assert not list((folder / "run" / "checkpoints").glob("*"))


def test_minor_m12_a_trailing_slash_does_not_encode_the_data_again(ctx, tmp_path):
    before = tree_state(ctx.cache)
    succeeded(cli("train_unet.py", *TINY, "--data", f"{ctx.shapes}/", "--vae", ctx.vae, "--output-dir",
                  tmp_path / "run", "--max-steps", 1, "cond.type=class", f"cache_dir={ctx.cache}",
                  "train.image_log_every=1000", "sample.num_images=1"))
    assert tree_state(ctx.cache) == before, "the same data set was encoded a second time"


def latent_store_command(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modules.data.latent_store", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)


@quick("minor_m12")
def _minor_m12(ctx, folder):
    caches = folder / "caches"
    shutil.copytree(ctx.cache, caches)
    (caches / "store_my_own_data").mkdir()               # the user's, only named like a store
    (caches / "store_my_own_data" / "keep.txt").write_text("mine")
    store = next(caches.glob("store_*/index.json")).parent
    return {"list": functools.partial(latent_store_command, "list", caches),
            "remove_not_a_store": functools.partial(latent_store_command, "remove", store,
                                                    caches / "store_my_own_data"),
            "remove": functools.partial(latent_store_command, "remove", store),
            "list_after": functools.partial(latent_store_command, "list", caches)}


def test_minor_m12_latent_stores_are_listed_with_their_key_and_size_and_removed(ctx, background):
    folder, res = background("minor_m12")
    index = json.loads(next(ctx.cache.glob("store_*/index.json")).read_text())
    name = next(ctx.cache.glob("store_*/index.json")).parent.name
    succeeded(res["list"])
    (line,) = res["list"].stdout.splitlines()              # the store, not the user's folder
    size_mib = sum(p.stat().st_size for p in (ctx.cache / name).rglob("*") if p.is_file()) / 2 ** 20
    assert line.startswith(str(folder / "caches" / name)) and f"{size_mib:.1f} MiB" in line, line
    spec = index["spec"]
    assert f"{spec['num_rows']} images" in line and spec["source"][:8] in line and spec["vae"][:8] in line
    refused(res["remove_not_a_store"], "store_my_own_data")
    assert "removed" not in res["remove_not_a_store"].stdout        # checked all before removing any
    succeeded(res["remove"])
    assert not (folder / "caches" / name).exists() and (folder / "caches" / "store_my_own_data" / "keep.txt").exists()
    succeeded(res["list_after"])
    assert res["list_after"].stdout == ""


@quick("minor_m13")
def _minor_m13(ctx, folder):
    edited = export_copy(ctx.unet, folder / "flipped")
    path = edited / "model.safetensors"
    blob = bytearray(path.read_bytes())
    header = struct.unpack("<Q", blob[:8])[0]
    blob[8 + header + 1001] ^= 0x10          # one bit inside the tensor data
    path.write_bytes(bytes(blob))
    return {"sample": functools.partial(cli, "sample.py", "--unet", edited, "--out", folder / "s", "--num-samples", 1)}


def test_minor_m13_a_flipped_bit_in_an_export_is_detected(background):
    _, res = background("minor_m13")
    refused(res["sample"], ("sha256", "sha-256", "hash", "checksum", "corrupt"))


@quick("minor_m11")
def _minor_m11(ctx, folder):
    return {"train": functools.partial(cli, "train_unet.py", "--data", ctx.shapes, "--vae", ctx.vae, "--output-dir",
                                       folder / "never_started", "--report-to", "none", "--resume", "latest")}


def test_minor_m11_resume_without_a_config_is_refused_at_once(background):
    folder, res = background("minor_m11")
    refused(res["train"], "config")
    assert not (folder / "latent_cache").exists() and not (folder / "never_started").exists()
