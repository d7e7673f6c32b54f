"""Checkpoints and resume: the machinery that makes a killed run lose nothing.

``checkpoints/step_N`` folders are written atomically (:class:`Checkpointer`, through
modules/durable.py) with the run's EMAs and counters, and carry the run's identity (script,
network config, sizes, VAE, text encoder, data), checked before anything is loaded; a stop signal
(SIGTERM, SIGINT, SIGHUP) makes the loop save and exit 0 at the end of the step
(:class:`StopRequest`); non-finite steps are counted on the device and read on logging and
checkpoint steps (:class:`TrainingState`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from modules import durable
from modules.config.io import apply_dict, changes_in, from_dict, path_keys, to_dict
from modules.config.legacy import legacy_sizes
from modules.core.compiling import without_compiled_prefix
from modules.core.ema import EMA
from modules.core.networks.denoiser import Sizes
from modules.errors import CheckpointError, ConfigError
from modules.run.layout import CHECKPOINTS

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STATE_NAME = "training_state.json"
IDENTITY_NAME = "identity.json"
_STEP_FOLDER = re.compile(r"step_(\d+)")


@dataclass
class RunIdentity:
    """What made a checkpoint; checked before it is continued, so nothing is loaded on a mismatch.

    Another script, another network (``model_sections`` of the config, and the sizes it was built
    for) or another frozen VAE or text encoder is refused: the weights would not fit, or would
    silently train in another latent space. Changed training data is allowed, with a warning.
    """
    script: str                         # "train_vae" | "train_unet"
    config: Any                         # the resolved run config (a config dataclass)
    model_sections: tuple[str, ...]     # config entries that define the network
    vae: Optional[str] = None           # identity of the frozen VAE (stage 2)
    data: Optional[str] = None          # fingerprint of the training data
    text_encoder: Optional[str] = None  # identity of the frozen text encoder (cond.type=text)
    sizes: Optional[dict] = None        # stage 2: what the network was built for (Sizes)
    store: Optional[str] = None         # stage 2: the latent store it trains on (recorded, not checked)

    def record(self) -> dict:
        """What ``identity.json`` holds."""
        return {"script": self.script, "config": to_dict(self.config), "vae": self.vae, "data": self.data,
                "text_encoder": self.text_encoder, "sizes": self.sizes, "store": self.store}

    def check(self, saved: dict, path: Path) -> None:
        """Refuse ``path`` (whose identity is ``saved``) when it cannot be continued by this run."""
        if saved.get("script") != self.script:
            raise CheckpointError(f"cannot resume from {path}: it was made by {saved.get('script')}.py, "
                                  f"not {self.script}.py")
        saved_config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
        try:   # the saved config as it reads today (earlier layouts upgraded, later fields at their defaults)
            then = to_dict(apply_dict(type(self.config)(), saved_config, str(path / IDENTITY_NAME)))
        except ConfigError as e:
            raise CheckpointError(f"cannot resume from {path}: its config does not read ({e})") from None
        # Paths are not the network: where a file was (relative then, absolute now) may change; what it held
        # is checked by identity (the VAE's and the text encoder's) below.
        paths = path_keys(self.config)
        changed = [line for line in changes_in(then, to_dict(self.config), self.model_sections)
                   if line.split(":", 1)[0] not in paths]
        if changed:
            raise CheckpointError(f"cannot resume from {path}: its checkpoints were made with another model "
                                  f"config ({'; '.join(changed)})")
        sizes = saved.get("sizes") or legacy_sizes(saved_config) if self.sizes is not None else None
        sizes = sizes_as_today(sizes)
        if sizes != self.sizes:
            raise CheckpointError(f"cannot resume from {path}: its network was built for other sizes ({sizes}; this "
                                  f"run's are {self.sizes}): another VAE, data with other classes or another encoder")
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


def sizes_as_today(sizes: Any) -> Any:
    """Recorded sizes (a ``Sizes`` dict) as they read today: inputs added since at their defaults, which
    reproduce what the network did before they existed. Unreadable ones are returned as they are (and
    then differ)."""
    if not isinstance(sizes, dict):
        return sizes
    try:
        return to_dict(from_dict(Sizes, sizes))
    except ConfigError:
        return sizes


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


class Checkpointer:
    """``checkpoints/step_N`` folders written atomically, the newest ``keep`` kept.

    A checkpoint is written into ``checkpoints/.tmp_step_N``: Accelerate's state, the EMAs (one
    file per process when they are sharded, else the main process's), the counters of ``state`` as
    JSON (registered with Accelerate they would be unpickled without restriction: a resume never
    runs code from a checkpoint's files) and the identity; then a manifest of every file, its size
    and its checksum is written last, every file is fsynced, and the folder is renamed. A folder counts as
    a checkpoint only if its manifest reads and every listed file has its recorded size, so a
    half-written or truncated checkpoint is never chosen for a resume; the checksums are checked before
    a checkpoint is loaded, and one whose content changed falls back to the previous one.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, keep: int, state: "TrainingState",
                 identity: RunIdentity, emas: Optional[dict[str, EMA]] = None, sharded_emas: bool = False):
        self.accelerator = accelerator
        self.root = output_dir / CHECKPOINTS
        self.keep = keep
        self.state = state
        self.identity = identity
        self.emas = emas or {}
        self.sharded_emas = sharded_emas

    def save(self, step: int) -> Path:
        acc = self.accelerator
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        try:
            if acc.is_main_process:
                self.root.mkdir(parents=True, exist_ok=True)
                durable.fresh_folder(tmp)
            acc.wait_for_everyone()
            acc.save_state(str(tmp), safe_serialization=True)
            self._save_emas(tmp)
            if acc.is_main_process:
                durable.write_json(tmp / STATE_NAME, self.state.state_dict())
                durable.write_json(tmp / IDENTITY_NAME, self.identity.record())
            acc.wait_for_everyone()
            if acc.is_main_process:
                durable.write_json(tmp / MANIFEST, {"step": step, "files": durable.manifest(tmp)})
                durable.publish_folder(tmp, final, sync=True)     # every file on disk before the rename
                self._prune()
        except durable.WRITE_ERRORS as e:
            if acc.is_main_process:
                durable.clear(tmp)
            raise CheckpointError(f"could not write checkpoint {final} ({durable.write_failure(e)}); "
                                  "the previous checkpoints are untouched") from None
        acc.wait_for_everyone()
        return final

    def _save_emas(self, folder: Path) -> None:
        if not self.emas:
            return
        acc = self.accelerator
        if not self.sharded_emas and acc.num_processes > 1:
            replicas_agree(self.emas, acc.gather)
            if acc.is_main_process:
                logger.info("EMA weights identical on all %d processes", acc.num_processes)
        if self.sharded_emas or acc.is_main_process:
            rank = acc.process_index if self.sharded_emas else 0
            tensors = {f"{name}.{key}": value.contiguous().cpu()
                       for name, ema in self.emas.items() for key, value in ema.state_dict().items()}
            save_file(tensors, ema_file(folder, rank))

    def _load_emas(self, folder: Path) -> None:
        if not self.emas:
            return
        rank = self.accelerator.process_index if self.sharded_emas else 0
        # read on the CPU, then moved: safetensors refuses indexed CPU names such as "cpu:0", which a
        # multi-process CPU run's accelerator.device is
        tensors = {k: v.to(self.accelerator.device)
                   for k, v in without_compiled_prefix(load_file(ema_file(folder, rank))).items()}
        for name, ema in self.emas.items():
            ema.load_state_dict({k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")})

    def _prune(self) -> None:
        for _, path in self.valid()[:-self.keep] if self.keep > 0 else []:
            durable.clear(path)
        for stale in self.root.glob(".tmp_step_*"):
            durable.clear(stale)

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
                problem = checkpoint_problem(path, deep=True)
                if problem:
                    raise CheckpointError(f"{problem}: damaged on disk")
                self.accelerator.load_state(str(path))
                self._load_emas(path)
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
            saved = durable.read_json(saved_path)
        except ValueError as e:
            raise CheckpointError(f"cannot resume from {path}: unreadable {IDENTITY_NAME} ({e})") from None
        self.identity.check(saved if isinstance(saved, dict) else {}, path)


def checkpoint_problem(path: Path, deep: bool = False) -> Optional[str]:
    """Why ``path`` is not a complete checkpoint, or None when it is (``deep``: every file's checksum too)."""
    if not path.is_dir():
        return "no such folder"
    if not (path / MANIFEST).is_file():
        return f"no {MANIFEST} (the checkpoint was not finished)"
    try:
        record = durable.read_json(path / MANIFEST)
    except ValueError as e:
        return f"unreadable {MANIFEST} ({e})"
    if not isinstance(record, dict) or "files" not in record:
        return f"unreadable {MANIFEST} (no file list)"
    return durable.manifest_problem(path, record["files"], deep=deep)


def unfinished(output_dir: Path) -> Optional[str]:
    """Why the training run in ``output_dir`` has not reached its ``train.max_steps`` (a stop signal ends a
    run with exit 0 after a checkpoint), or None: its newest complete checkpoint is of its last step. For
    whatever runs a stage after another (scripts/quickstart.py)."""
    output_dir = Path(output_dir)
    try:
        saved = durable.read_json(output_dir / "config.json")
        max_steps = saved["train"]["max_steps"]
    except (ValueError, TypeError, KeyError):
        return f"{output_dir} holds no readable config.json"
    done = max((int(match.group(1)) for path in (output_dir / CHECKPOINTS).glob("step_*")
                if (match := _STEP_FOLDER.fullmatch(path.name)) and checkpoint_problem(path) is None), default=0)
    if done != max_steps:
        return f"the run in {output_dir} stopped at step {done} of {max_steps}"
    return None


def ema_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / f"ema_rank{rank}.safetensors"


def replicas_agree(emas: dict[str, EMA], gather) -> None:
    """Replicated (not sharded) EMAs must be bit-identical on every process; fail loudly otherwise.

    ``gather`` collects one tensor from every process (``accelerator.gather``).
    """
    local = torch.stack([v.double().sum() for ema in emas.values() for v in ema.state_dict().values()]).sum()
    sums = gather(local.reshape(1))
    if not torch.all(sums == sums[0]):
        raise RuntimeError(f"EMA weights differ between processes (checksums {sums.tolist()})")


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
