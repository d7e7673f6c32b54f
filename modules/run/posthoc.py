"""Post-hoc EMA files: the snapshots a training run saves, and the EMA of any length rebuilt from them.

With ``ema.posthoc=true`` a stage-2 run tracks one power-function EMA (modules/core/posthoc_ema.py) per
length in ``ema.posthoc_sigma_rels`` and saves their weights every ``ema.posthoc_every`` steps and at its
last step (:class:`SnapshotTracker`):

    OUTPUT_DIR/posthoc_ema/step_000001000_sigma_0.05.safetensors   the network's state dict, that EMA's weights
    OUTPUT_DIR/posthoc_ema/index.json                              every snapshot: step, t, sigma_rel, size, digest

``t`` is the number of updates the EMA had applied (the steps less the skipped ones): the time axis of
its profile. The EMAs' own state is in the checkpoints (per process under FSDP, like the other EMAs),
so a resumed run continues them exactly. A snapshot's file is written atomically and fsynced before
the index lists it; at start, a run keeps only the listed snapshots of steps up to the one it starts
from: later ones belong to steps it does again, and an unlisted file is a write that a kill cut short.

:func:`reconstruct` combines the snapshots up to a step into the EMA of any length (EDM2's least
squares over the power profiles) after checking every snapshot's size and digest against the
index; :func:`export_reconstructions` writes each as a model folder (modules/run/export.py) that
sample.py and evaluate.py read. ``posthoc_ema.py`` is its command.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modules import durable
from modules.core.networks import build_network
from modules.core.posthoc_ema import PowerEMA, reconstruction, sigma_rel_problem
from modules.errors import ConfigError, ModelFolderError
from modules.run.export import DiffusersWriter, read_network_export, save_network
from modules.run.layout import POSTHOC_SNAPSHOTS

logger = logging.getLogger(__name__)

INDEX = "index.json"
META_KEY = "posthoc_ema"         # a snapshot file's own record: its step, t and sigma_rel
INDEX_LIMIT = 1 << 26            # bytes: an index of 10^5 snapshots is about 20 MB
LENGTHS_LIMIT = 64               # lengths reconstructed at once (each a float64 copy of the weights meanwhile)
_SNAPSHOT_NAME = re.compile(r"step_(\d{9,})_sigma_([0-9.e+-]+)\.safetensors")


def parse_lengths(text: str, flag: str) -> list[float]:
    """Comma-separated EMA lengths (sigma_rel), distinct, at most :data:`LENGTHS_LIMIT`; or a one-line ConfigError."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text[:40]}: expected comma-separated numbers") from None
    for value in values:
        problem = sigma_rel_problem(value)
        if problem:
            raise ConfigError(f"{flag}: {problem}")
    if len(set(values)) != len(values) or len(values) > LENGTHS_LIMIT:
        raise ConfigError(f"{flag}: expected at most {LENGTHS_LIMIT} distinct lengths, got {len(values)}")
    return values


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"step_{step:09d}_sigma_{sigma_rel:g}.safetensors"


def export_name(sigma_rel: float) -> str:
    """The model folder a reconstruction of length ``sigma_rel`` is exported to."""
    return f"unet_phema_{sigma_rel:g}"


@dataclass(frozen=True)
class Snapshot:
    """One snapshot as the index lists it."""
    file: str
    step: int           # optimizer steps done
    t: int              # updates the EMA applied: the time of its profile
    sigma_rel: float
    size: int
    digest: str         # durable.digest_file

    def record(self) -> dict:
        return asdict(self)


def _entry(value, where: str) -> Snapshot:
    """An index entry, type-checked (a damaged index is one line, never a traceback)."""
    def integer(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    ok = (isinstance(value, dict) and isinstance(value.get("file"), str) and _SNAPSHOT_NAME.fullmatch(value["file"])
          and integer(value.get("step")) and integer(value.get("t")) and value["t"] <= value["step"]
          and isinstance(value.get("sigma_rel"), (int, float)) and sigma_rel_problem(value["sigma_rel"]) is None
          and integer(value.get("size")) and isinstance(value.get("digest"), str))
    if not ok:
        raise ModelFolderError(f"{where}: not a snapshot entry ({str(value)[:120]})")
    return Snapshot(value["file"], value["step"], value["t"], float(value["sigma_rel"]), value["size"],
                    value["digest"])


def read_index(folder: Path) -> list[Snapshot]:
    """The snapshots ``folder/index.json`` lists; a missing, oversized or damaged index raises ModelFolderError."""
    path = folder / INDEX
    if not path.is_file():
        raise ModelFolderError(f"{path}: not found (no post-hoc EMA snapshots: train with ema.posthoc=true)")
    if path.stat().st_size > INDEX_LIMIT:
        raise ModelFolderError(f"{path}: {path.stat().st_size} bytes, not a snapshot index")
    try:
        record = durable.read_json(path)
    except ValueError as e:
        raise ModelFolderError(f"{path}: {e}") from None
    entries = record.get("snapshots") if isinstance(record, dict) else None
    if not isinstance(entries, list):
        raise ModelFolderError(f"{path}: no 'snapshots' list")
    return [_entry(entry, f"{path}, entry {i}") for i, entry in enumerate(entries)]


def write_index(folder: Path, snapshots: Sequence[Snapshot]) -> None:
    durable.write_json(folder / INDEX, {"snapshots": [s.record() for s in snapshots]}, sync=True)


def index_from_files(folder: Path) -> list[Snapshot]:
    """The index again, from the snapshot files' own records (their step, t and sigma_rel) and their content now:
    what a damaged index is replaced with. A file whose record does not read is left out, with a warning."""
    found = []
    for path in sorted(folder.glob("step_*.safetensors")):
        if not _SNAPSHOT_NAME.fullmatch(path.name):
            continue
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})[META_KEY])
            entry = {"file": path.name, **{k: meta[k] for k in ("step", "t", "sigma_rel")}, **durable.file_entry(path)}
            found.append(_entry(entry, str(path)))
        except Exception as e:    # a damaged file raises whatever its reader raises
            logger.warning("post-hoc EMA snapshot %s left out of the index: %s: %s", path, type(e).__name__, e)
    return found


# ----------------------------------------------------------------------------- during training

class SnapshotTracker:
    """A run's power-function EMAs (``emas``: for the checkpoints and the loop's updates, named
    ``posthoc_<sigma_rel>``) and their snapshots in ``OUTPUT_DIR/posthoc_ema``. ``owner`` and ``root``: as
    for :class:`modules.core.ema.EMA` (the network the EMAs mirror, the outermost wrapper around it)."""

    def __init__(self, ema_cfg, owner: torch.nn.Module, root: torch.nn.Module, output_dir: Path):
        self.emas = {f"posthoc_{s:g}": PowerEMA(owner, s, root=root) for s in ema_cfg.posthoc_sigma_rels}
        self.every = ema_cfg.posthoc_every
        self.folder = Path(output_dir) / POSTHOC_SNAPSHOTS
        self.snapshots: list[Snapshot] = []

    def begin(self, run) -> None:
        """After ``run.start``: keep the listed snapshots of the steps up to ``run.state.step``, remove the rest."""
        if run.is_main:
            with durable.failed_write_is(f"the post-hoc EMA snapshots in {self.folder}", "no step was trained"):
                self.snapshots = self._tidy(run.state.step)
        run.accelerator.wait_for_everyone()

    def _tidy(self, step: int) -> list[Snapshot]:
        if self.folder.is_symlink() or self.folder.is_file():     # planted: removed, never written through
            durable.clear(self.folder)
        self.folder.mkdir(exist_ok=True)
        try:
            listed = read_index(self.folder) if (self.folder / INDEX).exists() else []
        except ModelFolderError as e:
            logger.warning("%s; listing the snapshots again from their files (their content is not checked)", e)
            listed = index_from_files(self.folder)
        kept = [s for s in listed if s.step <= step]
        names = {s.file for s in kept} | {INDEX}
        for path in self.folder.iterdir():
            if path.name not in names:
                durable.clear(path)
        write_index(self.folder, kept)
        if len(kept) < len(listed):
            logger.info("removed %d post-hoc EMA snapshot(s) after step %d (those steps are done again)",
                        len(listed) - len(kept), step)
        return kept

    def due(self, run) -> bool:
        return run.every(self.every)

    def save(self, run, net: torch.nn.Module) -> None:
        """Snapshot every EMA at this step (``net``: what ``run.prepare`` returned; its full state dict is a
        collective under FSDP, so every process calls this)."""
        step, owner = run.state.step, run.network(net)
        for ema in self.emas.values():
            t = ema.num_updates
            with ema.swapped(owner):
                weights = run.state_dict(net)
                if run.is_main:
                    self._write(step, t, ema.sigma_rel, weights)
        if run.is_main:
            with durable.failed_write_is(f"the snapshot index {self.folder / INDEX}",
                                         "the checkpoints and the earlier snapshots are untouched"):
                write_index(self.folder, self.snapshots)

    def _write(self, step: int, t: int, sigma_rel: float, weights: dict[str, torch.Tensor]) -> None:
        path = self.folder / snapshot_name(step, sigma_rel)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        # one metadata entry: safetensors writes several in an arbitrary order, and the bytes must not vary
        meta = {META_KEY: json.dumps({"step": step, "t": t, "sigma_rel": sigma_rel})}
        with durable.failed_write_is(f"the post-hoc EMA snapshot {path}",
                                     "the checkpoints and the earlier snapshots are untouched"):
            durable.write_file(path, lambda tmp: save_file(tensors, str(tmp), meta), sync=True)
            entry = Snapshot(path.name, step, t, sigma_rel, **durable.file_entry(path))
        self.snapshots = [s for s in self.snapshots if s.file != entry.file] + [entry]


# ----------------------------------------------------------------------------- after training

def snapshots_folder(path: str | Path) -> Path:
    """``path/posthoc_ema`` of a run folder, or ``path`` itself when it is that folder."""
    path = Path(path)
    folder = path if path.name == POSTHOC_SNAPSHOTS else path / POSTHOC_SNAPSHOTS
    if not folder.is_dir():
        raise ModelFolderError(f"{path}: no post-hoc EMA snapshots (no {POSTHOC_SNAPSHOTS}/ folder); train with "
                               "ema.posthoc=true")
    return folder


def rebuild_index(path: str | Path) -> list[Snapshot]:
    """Replace the index of the run (or snapshot folder) ``path`` by :func:`index_from_files`'s."""
    folder = snapshots_folder(path)
    snapshots = index_from_files(folder)
    with durable.failed_write_is(f"the snapshot index {folder / INDEX}", "the snapshots are untouched"):
        write_index(folder, snapshots)
    return snapshots


@dataclass
class Selection:
    """The snapshots a reconstruction at ``step`` combines (``t``: its time in EMA updates)."""
    folder: Path
    snapshots: list[Snapshot]
    step: int
    t: int
    left_out: list[str]          # damaged or missing snapshots passed over (``skip_damaged``)


def select(path: str | Path, step: Optional[int] = None, skip_damaged: bool = False, deep: bool = True) -> Selection:
    """The snapshots up to ``step`` (None: the newest), checked against the index: size always, digest when
    ``deep``. A missing or damaged one raises ModelFolderError naming it, or with ``skip_damaged`` is left
    out (the others still reconstruct, with a coarser fit)."""
    folder = snapshots_folder(path)
    listed = read_index(folder)
    if not listed:
        raise ModelFolderError(f"{folder / INDEX}: lists no snapshot yet")
    steps = sorted({s.step for s in listed})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise ModelFolderError(f"{folder}: no snapshot at step {step} (snapshots at {len(steps)} steps, "
                               f"{steps[0]} to {steps[-1]}); a reconstruction is made at the time of a snapshot")
    snapshots, left_out = [], []
    for snapshot in (s for s in listed if s.step <= step):
        listed_as = {snapshot.file: {"size": snapshot.size, "digest": snapshot.digest}}
        problem = durable.manifest_problem(folder, listed_as, deep=deep)
        if problem is None:
            snapshots.append(snapshot)
        elif skip_damaged:
            left_out.append(f"{snapshot.file} ({problem})")
        else:
            raise ModelFolderError(f"{folder}: post-hoc EMA snapshot {problem.removeprefix('file ')}; pass "
                                   "--skip-damaged to reconstruct from the others")
    at_step = [s for s in snapshots if s.step == step]
    if not at_step:
        raise ModelFolderError(f"{folder}: every snapshot at step {step} is missing or damaged: reconstruct at an "
                               "earlier step (--step)")
    # Steps that were all skipped give snapshots of the same profile twice: keep the later one. t = 0: nothing yet.
    unique = {(s.t, s.sigma_rel): s for s in snapshots if s.t > 0}
    return Selection(folder, sorted(unique.values(), key=lambda s: (s.step, s.sigma_rel)), step, at_step[0].t,
                     left_out)


@dataclass
class Reconstruction:
    sigma_rel: float
    weights: dict[str, torch.Tensor]
    profile_error: float        # relative L2 distance of the fitted profile to the wanted one


def reconstruct(selection: Selection, sigma_rels: Sequence[float], parameters: set[str]) -> list[Reconstruction]:
    """The EMA of each length in ``sigma_rels`` at the selection's time, from its snapshots: the ``parameters``
    (names in the snapshots' state dicts) combined in float64, everything else (buffers) taken from the newest
    snapshot. Each snapshot is read once."""
    snapshots = selection.snapshots
    coefficients, errors = reconstruction([s.t for s in snapshots], [s.sigma_rel for s in snapshots], selection.t,
                                          sigma_rels)
    sums: list[dict[str, torch.Tensor]] = [{} for _ in sigma_rels]
    newest, keys = None, None
    for i, snapshot in enumerate(snapshots):
        path = selection.folder / snapshot.file
        try:        # the digest was checked: these are the bytes training wrote
            weights = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelFolderError(f"{path}: not a readable safetensors file ({e})") from None
        if keys is None:
            keys = {k: (v.shape, v.dtype) for k, v in weights.items()}
            if not parameters <= set(keys):
                raise ModelFolderError(f"{path}: does not hold the network's weights (missing "
                                       f"{sorted(parameters - set(keys))[:3]})")
        elif {k: (v.shape, v.dtype) for k, v in weights.items()} != keys:
            raise ModelFolderError(f"{path}: holds other tensors than {snapshots[0].file}")
        for j, total in enumerate(sums):
            for name in parameters:
                if name not in total:
                    total[name] = torch.zeros_like(weights[name], dtype=torch.float64)
                total[name].add_(weights[name], alpha=float(coefficients[i, j]))
        newest = weights
    results = []
    for j, sigma_rel in enumerate(sigma_rels):
        broken = [k for k, v in sums[j].items() if not torch.isfinite(v).all()]
        if broken:
            raise ModelFolderError(f"{selection.folder}: the snapshots give non-finite weights for sigma_rel "
                                   f"{sigma_rel:g} (e.g. '{broken[0]}'): a snapshot holds NaN or infinity")
        weights = {k: sums[j][k].to(v.dtype) if k in parameters else v for k, v in newest.items()}
        results.append(Reconstruction(sigma_rel, weights, float(errors[j])))
    return results


def network_parameters(export) -> set[str]:
    """The names of the averaged tensors: the network's parameters (built on the meta device: no memory)."""
    with torch.device("meta"):
        net = build_network(export.config.model, export.config.cond, export.sizes)
    return {name for name, _ in net.named_parameters()}


def export_reconstructions(run_dir: str | Path, sigma_rels: Sequence[float], out: Optional[str | Path] = None,
                           step: Optional[int] = None, skip_damaged: bool = False,
                           diffusers: Optional[Callable[..., DiffusersWriter]] = None) -> list[Path]:
    """Reconstruct the EMA of each of ``sigma_rels`` at ``step`` (None: the newest snapshot) from the run in
    ``run_dir`` and export each as ``OUT/unet_phema_<sigma_rel>`` (``out`` None: the run folder), a model folder
    with the run's config (from its ``unet_ema/`` export), its VAE's and text encoder's records, and what the
    reconstruction was made of (``posthoc_ema`` in its config.json); ``diffusers(config, sizes)``: the writer of its
    diffusers copy, as training's exports get (modules/interop/dit.py). Returns the folders."""
    for sigma_rel in sigma_rels:
        problem = sigma_rel_problem(sigma_rel)
        if problem:
            raise ModelFolderError(f"EMA length {problem}")
    selection = select(run_dir, step, skip_damaged)
    run_dir = selection.folder.parent
    export = read_network_export(run_dir / "unet_ema")
    for left in selection.left_out:
        logger.warning("left out of the reconstruction: %s", left)
    out = Path(out) if out is not None else run_dir
    folders = []
    for result in reconstruct(selection, sigma_rels, network_parameters(export)):
        about = {"posthoc_ema": {"sigma_rel": result.sigma_rel, "step": selection.step, "t": selection.t,
                                 "snapshots": [s.file for s in selection.snapshots],
                                 "left_out": selection.left_out, "profile_error": result.profile_error}}
        folder = out / export_name(result.sigma_rel)
        with durable.failed_write_is(f"the model folder {folder}", "the snapshots are untouched"):
            save_network(folder, result.weights, export.config, export.sizes, export.vae, "posthoc_ema",
                         export.text_encoder, about,
                         diffusers(export.config, export.sizes) if diffusers is not None else None)
        logger.info("EMA length sigma_rel=%g at step %d: %d snapshots, profile fit error %.2g %% -> %s",
                    result.sigma_rel, selection.step, len(selection.snapshots), 100 * result.profile_error, folder)
        folders.append(folder)
    return folders
