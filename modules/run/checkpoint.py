"""Checkpoints, resume and pre-emption: the machinery that makes a killed run lose nothing.

``checkpoints/step_N`` folders are written atomically (:class:`Checkpointer`); a stop signal
(SIGTERM, SIGINT, SIGHUP) makes the loop save and exit 0 at the end of the step
(:class:`StopRequest`); non-finite steps are counted (on logging and checkpoint steps, so the
loop never waits for the device) and too many in a row abort with the last good weights saved
(:func:`count_step`). Every write goes through :func:`write_or_fail`, so a full disk is a
one-line error that names what was kept, never a traceback.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from modules.config.schema import TrainConfig
from modules.config.io import changes_in, with_defaults
from modules.errors import CheckpointError, DataError, TrainingAborted
from modules.run.export import file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_NAME = "training_state.json"
IDENTITY_NAME = "identity.json"
_STEP_FOLDER = re.compile(r"step_(\d+)")


@dataclass
class RunIdentity:
    """What made a checkpoint; checked before it is continued, so nothing is loaded on a mismatch.

    Another script, another network (``model_sections`` of the config) or another frozen VAE
    is refused: the weights would not fit, or would silently train in another latent space.
    Changed training data is allowed, with a warning.
    """
    script: str                         # "train_vae" | "train_unet"
    config: dict                        # the resolved run config
    model_sections: tuple[str, ...]     # config entries that define the network
    vae: Optional[str] = None           # identity of the frozen VAE (stage 2)
    data: Optional[str] = None          # fingerprint of the training data
    defaults: Optional[dict] = None     # the default config: fields a checkpoint predates read as these
    text_encoder: Optional[str] = None  # identity of the frozen text encoder (cond.type=text)

    def record(self) -> dict:
        """What ``identity.json`` holds."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "defaults"}

    def check(self, saved: dict, path: Path) -> None:
        """Refuse ``path`` (whose identity is ``saved``) when it cannot be continued by this run."""
        if saved.get("script") != self.script:
            raise CheckpointError(f"cannot resume from {path}: it was made by {saved.get('script')}.py, "
                                  f"not {self.script}.py")
        changed = changes_in(with_defaults(saved.get("config") or {}, self.defaults), self.config, self.model_sections)
        if changed:
            raise CheckpointError(f"cannot resume from {path}: its checkpoints were made with another model "
                                  f"config ({'; '.join(changed)})")
        if saved.get("vae") != self.vae:
            raise CheckpointError(
                f"cannot resume from {path}: it was trained with another VAE (identity {str(saved.get('vae'))[:16]}; "
                f"the VAE given now is {str(self.vae)[:16]}), whose latent space differs. Resume with the VAE it "
                "was trained with (the run keeps a copy in frozen_vae/: --vae OUTPUT_DIR/frozen_vae) "
                "or start a new run")
        if saved.get("text_encoder") != self.text_encoder:
            raise CheckpointError(f"cannot resume from {path}: it was trained with another text encoder (identity "
                                  f"{str(saved.get('text_encoder'))[:16]}; the one given now is "
                                  f"{str(self.text_encoder)[:16]}): resume with the encoder it was trained with")
        if saved.get("data") != self.data:
            logger.warning("the training data changed since %s was saved (files added, removed or replaced); "
                           "training continues on the data as it is now", path)


@dataclass
class TrainingState:
    """Counters that must survive a resume (saved with every checkpoint)."""
    step: int = 0                     # optimizer steps done
    bad_steps: int = 0                # non-finite steps skipped in total
    consecutive_bad_steps: int = 0
    substituted_images: int = 0       # unreadable images replaced at load time
    # Steps whose finiteness the host has not read yet: (step, 0-d bool tensor on the device).
    # Not saved: a checkpoint counts them first (state_dict).
    unread: list = field(default_factory=list, repr=False, compare=False)

    def state_dict(self) -> dict:
        self.count_unread()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "unread"}

    def load_state_dict(self, state: dict) -> None:
        self.unread.clear()
        for key, value in state.items():
            setattr(self, key, int(value))

    def count_unread(self) -> list[tuple[int, int]]:
        """Read the unread steps' flags (one transfer for all), count and log the bad ones; returns
        (step, bad steps in a row there) for each bad step."""
        if not self.unread:
            return []
        finite = torch.stack([flag for _, flag in self.unread]).tolist()
        steps = [step for step, _ in self.unread]
        self.unread.clear()
        bad = []
        for step, ok in zip(steps, finite):
            if ok:
                self.consecutive_bad_steps = 0
                continue
            self.bad_steps += 1
            self.consecutive_bad_steps += 1
            bad.append((step, self.consecutive_bad_steps))
            logger.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                           step, self.consecutive_bad_steps)
        return bad

    def due(self, every: int, last_step: int) -> bool:
        """Whether a thing done every ``every`` steps, and after the last one, is due at this step."""
        return self.step % every == 0 or self.step == last_step


# A write that fails (disk full, quota, read-only or vanished folder) surfaces as OSError from
# Python, RuntimeError from torch.save and SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def write_failure(e: BaseException) -> str:
    """What went wrong with a write, for a one-line message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}; is the disk full?"


def write_or_fail(write: Callable[[], None], what: str, kept: str) -> None:
    """Run ``write``; a failed write is a CheckpointError saying ``what`` failed and what is ``kept``."""
    try:
        write()
    except WRITE_ERRORS as e:
        raise CheckpointError(f"could not write {what} ({write_failure(e)}); {kept}") from None


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)``, then rename it onto ``path``: a failed write leaves neither a partial ``path`` nor the tmp."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def export_or_fail(export: Callable[[], None], output_dir: Path, step: int) -> None:
    """Run ``export`` (written after checkpoint ``step``); a failed write is a CheckpointError."""
    write_or_fail(export, f"the exported models in {output_dir}",
                  f"checkpoint step_{step} is saved and the previous exports are untouched")


def checkpoint_if_due(state: TrainingState, cfg: TrainConfig, stop: "StopRequest", checkpointer: "Checkpointer",
                      export: Callable[[], None], output_dir: Path) -> bool:
    """Checkpoint and export every ``checkpoint_every`` steps, at the last step and when a stop
    signal arrived; returns True when the run must stop now."""
    stopping = stop.requested()
    if state.due(cfg.checkpoint_every, cfg.max_steps) or stopping:
        checkpointer.save(state.step)
        export_or_fail(export, output_dir, state.step)
    if stopping:
        logger.info("%s received: saved step %d, exiting; continue with --resume latest",
                    stop.signal_name or "stop", state.step)
    return stopping


def count_step(state: TrainingState, finite, cfg: TrainConfig, checkpointer: "Checkpointer") -> None:
    """Advance the step counter and note whether the step was ``finite`` (a 0-d bool tensor, left on
    the device: no host read). The notes are read at logging and checkpoint steps and at the last
    step: each skipped step is logged and counted, and ``train.max_bad_steps`` of them in a row save
    the state and abort the run. The abort may so come up to ``log_every`` steps after the limit was
    reached; the weights saved then are still the last good ones, since bad updates never apply."""
    state.step += 1
    state.unread.append((state.step, torch.as_tensor(finite)))
    if not (state.due(cfg.log_every, cfg.max_steps) or state.due(cfg.checkpoint_every, cfg.max_steps)):
        return
    limit = next(((step, run) for step, run in state.count_unread() if run >= cfg.max_bad_steps), None)
    if limit is None:
        return
    checkpointer.save(state.step)
    step, run = limit
    later = (f" (step_{state.step}: steps are counted at logging and checkpoint steps)"
             if step != state.step else "")
    raise TrainingAborted(f"{run} consecutive non-finite steps at step {step}; saved the last good weights in "
                          f"{checkpointer.root}{later}")


@contextlib.contextmanager
def saved_on_data_error(checkpointer: "Checkpointer", state: TrainingState) -> Iterator[None]:
    """Data that fails mid-run (its folder vanished, every image unreadable) saves the last good
    state before the one-line error, so no step done is lost."""
    try:
        yield
    except DataError as e:
        checkpointer.save(state.step)
        # A DataLoader worker's error arrives with its traceback in the message: keep the last line.
        reason = str(e).strip().splitlines()[-1].removeprefix(f"{DataError.__module__}.DataError: ")
        raise DataError(f"{reason}; saved step {state.step} in {checkpointer.root}: once the data is back, "
                        "continue with --resume latest") from None


class Checkpointer:
    """``checkpoints/step_N`` folders written atomically, the newest ``keep`` kept.

    A checkpoint is written into ``checkpoints/.tmp_step_N``, a manifest of every file, its size
    and its SHA-256 (after an fsync) is written last, then the folder is renamed. A folder counts
    as a checkpoint only if its manifest is present and every listed file has its recorded size,
    so a half-written or truncated checkpoint is never chosen for a resume; the hashes are checked
    before a checkpoint is loaded, and one whose content changed falls back to the previous one. The counters of ``state`` are stored as
    JSON rather than registered with Accelerate, which would unpickle them without restriction:
    a resume never runs code from a checkpoint's files.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, keep: int, state: TrainingState,
                 identity: RunIdentity, extra_save: Callable[[Path], None] = lambda path: None,
                 extra_load: Callable[[Path], None] = lambda path: None):
        self.accelerator = accelerator
        self.root = output_dir / "checkpoints"
        self.keep = keep
        self.state = state
        self.identity = identity
        self.extra_save = extra_save
        self.extra_load = extra_load

    def save(self, step: int) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        try:
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            self.extra_save(tmp)
            if acc.is_main_process:
                (tmp / STATE_NAME).write_text(json.dumps(self.state.state_dict()))
                (tmp / IDENTITY_NAME).write_text(json.dumps(self.identity.record(), indent=1))
            acc.wait_for_everyone()
            if acc.is_main_process:
                files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _synced_sha256(p)}
                         for p in sorted(tmp.rglob("*")) if p.is_file()}
                _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=1))
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
                _fsync_dir(self.root)
                self._prune()
        except WRITE_ERRORS as e:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final} ({write_failure(e)}); "
                                  "the previous checkpoints are untouched") from None
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        for _, path in self.valid()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)

    def valid(self) -> list[tuple[int, Path]]:
        """(step, folder) of complete checkpoints, oldest first."""
        return sorted((step, path) for step, path in self._candidates() if checkpoint_problem(path) is None)

    def _candidates(self) -> list[tuple[int, Path]]:
        """(step, folder) of every ``step_N`` folder; copies such as ``step_60_bak`` are not checkpoints."""
        found = []
        for path in self.root.glob("step_*"):
            match = _STEP_FOLDER.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return found

    def resolve(self, resume: Optional[str]) -> list[Path]:
        """Checkpoints to try for ``--resume``, best first ([] = start fresh)."""
        if not resume:
            return []
        if resume != "latest":
            path = Path(resume)
            problem = checkpoint_problem(path)
            if problem:
                raise CheckpointError(f"cannot resume from {path}: {problem}")
            return [path]
        for _, path in sorted(self._candidates(), reverse=True):
            problem = checkpoint_problem(path)
            if problem:
                logger.warning("skipping checkpoint %s: %s", path, problem)
        return [path for _, path in reversed(self.valid())]

    def load(self, resume: Optional[str]) -> Optional[Path]:
        """Load the newest loadable checkpoint; falls back to older ones and says so."""
        candidates = self.resolve(resume)
        if resume == "latest" and not candidates:
            logger.info("--resume latest: no checkpoint in %s, starting from scratch", self.root)
        for i, path in enumerate(candidates):
            self._check_identity(path)
            try:
                _verify_contents(path)
                self.accelerator.load_state(str(path))
                self.extra_load(path)
                self.state.load_state_dict(json.loads((path / STATE_NAME).read_text()))
                logger.info("resumed from %s", path)
                return path
            except Exception as e:  # a damaged file raises whatever its reader raises
                if resume != "latest" or i == len(candidates) - 1:
                    raise CheckpointError(f"cannot resume from {path}: {type(e).__name__}: {e}") from None
                logger.warning("checkpoint %s failed to load (%s: %s); falling back to %s",
                               path, type(e).__name__, e, candidates[i + 1])
        return None


    def _check_identity(self, path: Path) -> None:
        saved_path = path / IDENTITY_NAME
        if not saved_path.is_file():
            logger.warning("%s was made by an older version, without %s: its model config, VAE and data "
                           "are not checked", path, IDENTITY_NAME)
            return
        try:
            saved = json.loads(saved_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot resume from {path}: unreadable {IDENTITY_NAME} ({e})") from None
        self.identity.check(saved if isinstance(saved, dict) else {}, path)


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or None when it is."""
    manifest = path / MANIFEST
    if not path.is_dir():
        return "no such folder"
    if not manifest.is_file():
        return f"no {MANIFEST} (the checkpoint was not finished)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, entry in files.items():
        f = path / name
        size = entry["size"] if isinstance(entry, dict) else entry
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    return None


def _verify_contents(path: Path) -> None:
    """The files' SHA-256 against the manifest (read in full, so done once, before loading)."""
    for name, entry in json.loads((path / MANIFEST).read_text())["files"].items():
        if isinstance(entry, dict) and file_sha256(path / name) != entry["sha256"]:
            raise CheckpointError(f"file {name} differs from the manifest (SHA-256): damaged on disk")


def _synced_sha256(path: Path) -> str:
    """The file's SHA-256, after forcing its data to disk: a manifest never lists data a power cut can lose."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return file_sha256(path)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StopRequest:
    """SIGTERM / SIGINT / SIGHUP set a flag; the loop saves a checkpoint at the next step and exits 0.

    In a multi-process run every process must take the same decision at the same step, so
    the flag is combined across processes with an all-reduce (one scalar per step).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.signal_name: Optional[str] = None
        self.previous: dict = {}

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        flag = self.signal_name is not None
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)
