"""Evaluation: FID, KID, precision / recall and Inception Score of generated images, and sweeps.

    python evaluate.py stats   --inception inception-2015-12-05.pt data/train --out ref.npz
    python evaluate.py fid     --inception inception-2015-12-05.pt samples/ ref.npz
    python evaluate.py metrics --inception inception-2015-12-05.pt samples/ ref.npz --kid --pr --is
    accelerate launch evaluate.py sweep --inception inception-2015-12-05.pt --unet runs/unet --ref ref.npz \\
        --steps 1,2,4,8,16,32,64,128 --cfg-scales 1,1.5,2 --num-samples 50000 --out runs/unet/sweep
    accelerate launch evaluate.py sweep --inception inception-2015-12-05.pt --unet runs/imf --ref ref.npz \\
        --steps 1,2 --cfg-scales 4,6,8,10 --guidance-interval 0.35 0.60 --num-samples 50000 --out runs/imf/sweep

A reference is an image folder, a ``datasets`` save_to_disk folder, an ADM reference ``.npz``
(images ``arr_0``) or a statistics ``.npz`` written by ``stats`` (mu, sigma and the features,
so KID and precision/recall work against it), read lazily: each array once, only when needed,
its header checked against the file before anything is allocated (``NpzReference``). Images:
the files of a sample.py manifest or an imagefolder metadata file (paths inside the folder only),
else every image file under the folder but ``masks/``; read and resized as clean-fid does
(modules/eval/features.py). Samples are not scored against a reference made from images of
another resolution (the statistics file records it) unless ``--allow-other-resolution``: that is
a different measurement (clean-fid keeps statistics per resolution for the same reason).
Under ``accelerate launch`` every process extracts (and, in a sweep, generates) its share and keeps
its features; FID's sums are reduced over the processes, and rows reach the main process only for
KID, precision/recall (computed there in float32 tiles on its ``--device``), the Inception Score or
a statistics file.

A sweep claims its ``--out`` (``durable.claim_output``) and keys each cell's row of ``sweep.json``
by everything it was computed from (the reference, the extractor, the samples' request): a row of
another key, or one without a score now asked for, is scored again from the kept samples. Every
number on the command line is bounded (``number_rules``), and a reference's feature width is
checked against the extractor's before anything is extracted or sampled. ``--inception`` is NVIDIA's
TorchScript file, which runs code when loaded (vouch for it with ``--inception-sha256`` or
``--trust-inception-code``), or pytorch-fid's state dict, read without running code (a
``--inception-sha256`` given is still checked); the file's content decides which.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate import PartialState

from modules import durable
from modules.config.schema import SAMPLE_STEPS_LIMIT
from modules.core.metrics import frechet_distance, inception_score, kernel_inception_distance, precision_recall
from modules.core.settings import at_most, non_negative, positive
from modules.errors import MetricsError, UserError
from modules.eval.features import (INCEPTION_URL, PYTORCH_FID_WEIGHTS, Features, NpzReference, check_feature_width,
                                   extract, feature_width, list_images, load_inception, reference_sources, save_stats,
                                   size_text)
from modules.eval.plots import line_plot
from modules.run import posthoc
from modules.run.accelerator import finish, from_main_process, process_state
from modules.run.export import find_model_folder, read_network_export
from modules.run.model_card import markdown_table
from modules.run.tracking import add_log_to_flag, log_scores, log_sweep


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception", required=True, metavar="PATH",
                        help=f"local TorchScript inception-2015-12-05.pt (from {INCEPTION_URL}) or pytorch-fid's "
                             f"{PYTORCH_FID_WEIGHTS} (a state dict, read without running code)")
    parser.add_argument("--inception-sha256", default=None, metavar="HEX",
                        help="the SHA-256 the Inception file must have (required for a TorchScript file, which runs "
                             "code when loaded)")
    parser.add_argument("--trust-inception-code", action="store_true",
                        help="load the Inception file without checking its SHA-256: this runs its code")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu (each process's own GPU when launched)")
    parser.add_argument("--image-size", type=int, default=299,
                        help="images are resized to this square size before the extractor (default 299)")
    parser.add_argument("--workers", type=int, default=4, help="image-decoding threads")


def _add_metric_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-other-resolution", action="store_true",
                        help="score samples against a reference made from images of another resolution "
                             "(a different measurement: refused without this flag)")
    parser.add_argument("--kid", action="store_true", help="also KID (needs the reference's features)")
    parser.add_argument("--pr", action="store_true", help="also precision and recall, k = 3 (needs the features)")
    parser.add_argument("--is", dest="inception_score", action="store_true", help="also the Inception Score")
    add_log_to_flag(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluation of generated images.")
    sub = parser.add_subparsers(dest="command", required=True)
    fid = sub.add_parser("fid", help="FID between FOLDER_A and a reference (printed alone)")
    _add_common(fid)
    fid.add_argument("--allow-other-resolution", action="store_true",
                     help="score samples against a reference made from images of another resolution")
    fid.add_argument("folder_a", metavar="FOLDER_A", help="image folder (e.g. generated samples)")
    fid.add_argument("reference", metavar="REFERENCE", help="image folder, save_to_disk folder or .npz")
    fid.add_argument("--save-stats", metavar="OUT.npz", help="also save FOLDER_A's statistics")
    add_log_to_flag(fid)
    metrics = sub.add_parser("metrics", help="FID and the chosen metrics as one JSON line")
    _add_common(metrics)
    _add_metric_flags(metrics)
    metrics.add_argument("folder_a", metavar="FOLDER_A")
    metrics.add_argument("reference", metavar="REFERENCE")
    stats = sub.add_parser("stats", help="save a reference's statistics and features (compute them once)")
    _add_common(stats)
    stats.add_argument("folder", metavar="REFERENCE")
    stats.add_argument("--out", required=True, metavar="OUT.npz")
    sweep = sub.add_parser("sweep", help="sample and score every (steps, guidance) combination; resumable")
    _add_common(sweep)
    _add_metric_flags(sweep)
    sweep.add_argument("--unet", required=True, help="exported UNet folder or train_unet.py output dir")
    sweep.add_argument("--ref", required=True, help="reference (best: a stats .npz, computed once)")
    sweep.add_argument("--steps", default="1,2,4,8,16,32,64,128")
    sweep.add_argument("--cfg-scales", default=None, help="comma-separated guidance scales (default: the model's, "
                       "1 but for iMF's imf.sample_scale); an iMF model takes each as an input")
    sweep.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                       help="objective=imf: the guidance interval of every cell, as sample.py takes it")
    sweep.add_argument("--num-samples", type=int, default=50000)
    sweep.add_argument("--sample-batch-size", type=int, default=64)
    sweep.add_argument("--seed", type=int, default=0)
    cond = sweep.add_mutually_exclusive_group()     # passed to sample.py, as sample.py reads them
    cond.add_argument("--class-label", default=None, help="class-conditioned model: a class, 'all' (default) or "
                      "'random'")
    cond.add_argument("--masks", default=None, help="mask-conditioned model: one sample per mask file in this "
                      "folder (--num-samples is not used)")
    cond.add_argument("--prompt", default=None, help="text-conditioned model: --num-samples images of this prompt")
    cond.add_argument("--prompts", default=None, help="text-conditioned model: a file of prompts, one per line, "
                      "--num-samples images each")
    sweep.add_argument("--text-encoder", default=None, help="text-conditioned model: its text encoder folder, if "
                       "moved")
    sweep.add_argument("--ema-lengths", default=None, help="post-hoc EMA lengths (sigma_rel) to sweep, comma-"
                       "separated: --unet is a run trained with ema.posthoc=true, each length is reconstructed into "
                       "OUT/models/")
    sweep.add_argument("--out", required=True, help="folder for the samples, sweep.md, sweep.json and sweep.png")
    return parser


# ----------------------------------------------------------------------------- features and scores

@dataclass
class Reference:
    """What samples are scored against: a statistics file, read lazily and once (``file``), or the features
    extracted from images (``extracted``: each process holds its share of the rows, and every process the
    statistics)."""
    name: str
    file: Optional[NpzReference] = None
    extracted: Optional[Features] = None
    on_main_process: bool = True

    @property
    def stats(self) -> tuple[np.ndarray, np.ndarray]:       # mu, sigma
        return self.file.stats() if self.file is not None else self.extracted.statistics()

    def features(self) -> Optional[np.ndarray]:
        """Every feature vector on the main process (KID and precision/recall), None on the others; with
        several processes every one calls it."""
        if self.file is not None:
            return self.file.features() if self.on_main_process else None
        return self.extracted.all_rows()

    @property
    def has_features(self) -> bool:
        return self.file is None or self.file.has_features()

    @property
    def width(self) -> int:
        return self.file.feature_width() if self.file is not None else self.extracted.width

    @property
    def source_size(self) -> Optional[tuple[int, int]]:      # (height, width) of its images, when one size
        return self.file.source_size() if self.file is not None else self.extracted.source_size

    def identity(self) -> dict:
        """What the reference is, for the key of a score against it (with several processes every one calls it):
        the statistics file's content (:meth:`NpzReference.identity`, without reading its features), or the
        digest of the extracted features."""
        if self.file is not None:
            return self.file.identity()
        return {"features_sha256": self.extracted.digest(), "shape": [self.extracted.count, self.extracted.width],
                "source_size": self.source_size}


class Evaluator:
    """The extractor and the settings every command shares, on this process's device."""

    def __init__(self, args: argparse.Namespace, state: PartialState):
        self.args, self.state = args, state
        self.device = self._device(args.device)
        self.extractor = load_inception(args.inception, self.device, args.inception_sha256, args.trust_inception_code)
        self.width = feature_width(self.extractor, args.image_size, self.device,
                                   probabilities=getattr(args, "inception_score", False))
        self._identity: Optional[dict] = None

    def _device(self, name: Optional[str]) -> torch.device:
        if name == "cuda" and not torch.cuda.is_available():
            raise MetricsError("--device cuda: no CUDA device is available (use --device cpu)")
        if self.state.num_processes > 1:
            return self.state.device
        return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))

    def identity(self) -> dict:
        """What the extractor is (its file's SHA-256) and what it sees (the image size), for the keys of scores."""
        if self._identity is None:
            self._identity = {"inception_sha256": durable.sha256_file(self.args.inception),
                              "image_size": self.args.image_size}
        return self._identity

    def check_width(self, reference: Optional[NpzReference], name: str) -> None:
        """At start-up, before anything is extracted or sampled: a statistics file of another network is
        refused, and so is a sweep of fewer samples per cell than the features have dimensions."""
        if reference is not None and reference.holds_statistics:
            check_feature_width(self.width, reference.feature_width(), name, self.args.inception)
        a = self.args
        if a.command == "sweep" and a.masks is None and a.prompts is None and a.num_samples < self.width:
            raise MetricsError(f"--num-samples {a.num_samples}: fewer samples per cell than the extractor's "
                               f"{self.width}-d features make their covariance singular and the FID meaningless; use "
                               f"at least {self.width} (the papers use 50 000)")

    def features(self, sources, probabilities: bool = False):
        a = self.args
        return extract(sources, self.extractor, a.batch_size, self.device, a.image_size, a.workers, probabilities,
                       self.state if self.state.num_processes > 1 else None)

    def reference(self, reference: str, opened: Optional[NpzReference]) -> Reference:
        """A reference, its features extracted when it is made of images (every process its share).
        ``opened``: the reference file preflight opened (read once)."""
        sources = reference_sources(reference, opened)
        main = self.state.is_main_process
        if sources is None:
            return Reference(reference, file=opened, on_main_process=main)
        return Reference(reference, extracted=self.features(sources), on_main_process=main)

    def check_resolution(self, sample_size: Optional[tuple[int, int]], reference: Reference) -> None:
        """Refuse samples of another resolution than the reference's images, unless allowed."""
        problem = resolution_problem(sample_size, reference.source_size, reference.name,
                                     getattr(self.args, "allow_other_resolution", False))
        if problem:
            raise MetricsError(problem)

    def scores(self, samples: Features, reference: Reference, want_kid: bool, want_pr: bool,
               want_is: bool) -> Optional[dict]:
        """FID and the chosen metrics of extracted samples against a reference, on the main process (None on the
        others; with several processes every one calls it). FID comes from the moments every process already
        has; only KID, precision/recall and the Inception Score bring rows to the main process."""
        self.check_resolution(samples.source_size, reference)
        if samples.width != reference.width:
            raise MetricsError(f"the reference has {reference.width}-d features but the extractor gives "
                               f"{samples.width}-d: statistics from a different network")
        if samples.count < samples.width:
            raise MetricsError(f"{samples.count} samples for {samples.width}-d features: their covariance is "
                               f"singular and the FID meaningless; use at least {samples.width} (the papers use "
                               "50 000)")
        check_features_for(reference.name, reference.has_features, want_kid, want_pr)
        sample_rows = samples.all_rows() if want_kid or want_pr else None
        reference_rows = reference.features() if want_kid or want_pr else None
        probabilities = samples.all_probabilities() if want_is else None
        if not self.state.is_main_process:
            return None
        result = {"num_samples": samples.count, "fid": frechet_distance(*samples.statistics(), *reference.stats)}
        if want_kid:
            result["kid"], result["kid_std_error"] = kernel_inception_distance(sample_rows, reference_rows,
                                                                               device=self.device)
        if want_pr:
            result["precision"], result["recall"] = precision_recall(reference_rows, sample_rows, device=self.device)
        if want_is:
            result["inception_score"], result["inception_score_std"] = inception_score(
                probabilities, splits=min(10, samples.count))
        return result


def writable(out: Path) -> None:
    """Refuse a statistics file that could not be written, before the (slow) feature extraction. The probe is
    created exclusively under a random name (a link planted in the folder is never written through)."""
    if out.suffix != ".npz":
        raise MetricsError(f"statistics file {out}: must end in .npz")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MetricsError(f"statistics file {out}: cannot be written ({e.strerror or e})") from None


def check_features_for(name: str, has_features: bool, want_kid: bool, want_pr: bool) -> None:
    if (want_kid or want_pr) and not has_features:
        raise MetricsError(f"KID and precision/recall need the reference's features, and {name} holds only mu and "
                           "sigma: make it with `evaluate.py stats` (or pass the image folder)")


# ----------------------------------------------------------------------------- commands

def number_rules(command: str) -> dict[str, tuple]:
    """The bounds of every number a user types (issue 21, rule 5): far above any real use, below a typo's
    extra zeros. The sweep's sampling numbers take sample.py's own bounds, since it passes them on."""
    rules = {"batch_size": (positive, at_most(4096)),         # images through the extractor at once
             "image_size": (positive, at_most(1024)),         # what the extractor sees (as eval.image_size)
             "workers": (positive, at_most(256))}             # image-decoding threads
    if command == "sweep":
        import sample
        rules.update(num_samples=(positive, at_most(sample.MAX_SAMPLES)),
                     sample_batch_size=(positive, at_most(sample.MAX_BATCH)),
                     seed=(non_negative, at_most(2 ** sample.SEED_BITS - 1)))
    return rules


def check_numbers(args) -> None:
    """Every number on the command line within its bounds, before anything is read or loaded."""
    for name, rules in number_rules(args.command).items():
        value = getattr(args, name, None)
        for rule in rules if value is not None else ():
            problem = rule(value)
            if problem:
                text = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} digits)"
                raise MetricsError(f"--{name.replace('_', '-')} {text}: {problem.replace(str(value), text)}")


def resolution_problem(sample_size: Optional[tuple[int, int]], reference_size: Optional[tuple[int, int]],
                       reference: str, allowed: bool) -> Optional[str]:
    """Why samples of ``sample_size`` are not scored against a reference made from ``reference_size``, or None."""
    if sample_size is None or reference_size is None or sample_size == reference_size or allowed:
        return None
    return (f"the samples are {size_text(sample_size)} but the reference {reference} was made from "
            f"{size_text(reference_size)}: a score across resolutions is a different measurement; make the reference "
            "at the samples' resolution, or pass --allow-other-resolution to compare them anyway")


def preflight(args) -> Optional[NpzReference]:
    """Every input and output checked before the Inception network is loaded or anything extracted. Returns the
    reference file, opened (its arrays are read once, when first needed), or None (images)."""
    check_numbers(args)
    reference = args.folder if args.command == "stats" else args.ref if args.command == "sweep" else args.reference
    if not Path(reference).exists():
        raise MetricsError(f"reference {reference} not found")
    model_size = None
    if args.command == "sweep":             # the condition flags fit the model: nothing fails after Inception
        import sample
        folder = find_model_folder(args.unet, "unet_ema")
        export = read_network_export(folder)
        cfg = export.config
        model_size = (cfg.data.image_size, cfg.data.image_size)
        args.class_label = sample.parse_class_label(args.class_label)
        problem = sample.condition_flags_problem(args, cfg.cond.type, export.sizes.num_classes, folder)
        for n in sweep_list(args.steps, int, "--steps"):
            if not 1 <= n <= SAMPLE_STEPS_LIMIT:
                problem = problem or f"--steps {args.steps}: each must be at least 1 and at most {SAMPLE_STEPS_LIMIT}"
            problem = problem or cfg.sampling_problem(None, n)
        if args.cfg_scales is None:         # the model's own scale: one column
            args.cfg_scales = f"{cfg.sampling_guidance(None, None)[0]:g}"
        for w in sweep_list(args.cfg_scales, float, "--cfg-scales"):
            problem = problem or cfg.guidance_problem(w) or cfg.unconditional_problem(w)
        interval = args.guidance_interval
        if interval is not None and not problem:
            wrong = (cfg.guidance_interval_problem(interval) if all(map(math.isfinite, interval))
                     else "expected finite numbers")
            problem = wrong and f"--guidance-interval {' '.join(f'{v:g}' for v in interval)}: {wrong}"
        if problem:
            raise MetricsError(problem)
        if args.ema_lengths is not None:    # the lengths, and the snapshots (their digests: when reconstructed)
            posthoc.parse_lengths(args.ema_lengths, "--ema-lengths")
            posthoc.select(args.unet, deep=False)
    opened = NpzReference(reference) if Path(reference).suffix == ".npz" else None
    if opened is not None and opened.holds_statistics:     # a statistics file: validated now, each array read once
        opened.stats()
        check_features_for(reference, opened.has_features(), getattr(args, "kid", False), getattr(args, "pr", False))
        problem = resolution_problem(model_size, opened.source_size(), reference,
                                     getattr(args, "allow_other_resolution", False))
        if problem:
            raise MetricsError(problem)
    elif opened is not None:
        opened.images()                     # an ADM batch: its header checked now, its images read when extracted
    if args.command in ("fid", "metrics"):
        list_images(args.folder_a)          # exists, holds images, and a sampling run there finished
    for out in (getattr(args, "out", None) if args.command == "stats" else None, getattr(args, "save_stats", None)):
        if out:
            writable(Path(out))
    return opened


def run_stats(ev: Evaluator, args, opened: Optional[NpzReference]) -> None:
    reference = ev.reference(args.folder, opened)
    features = reference.features()
    if ev.state.is_main_process:
        print(f"wrote {save_stats(args.out, *reference.stats, features, reference.source_size)}")


def run_scores(ev: Evaluator, args, opened: Optional[NpzReference]) -> None:
    want = (getattr(args, "kid", False), getattr(args, "pr", False), getattr(args, "inception_score", False))
    samples = ev.features(list_images(args.folder_a), probabilities=want[2])
    reference = ev.reference(args.reference, opened)
    if getattr(args, "save_stats", None):
        rows = samples.all_rows()
        if ev.state.is_main_process:
            save_stats(args.save_stats, *samples.statistics(), rows, samples.source_size)
    result = ev.scores(samples, reference, *want)
    if ev.state.is_main_process:
        print(f"{result['fid']:.6f}" if args.command == "fid" else json.dumps(result))
        log_scores(args.log_to, result)


def sweep_list(text: str, kind, flag: str) -> list:
    """A comma-separated list of numbers, or one line naming the flag."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise MetricsError(f"{flag} {text[:40]}: expected comma-separated numbers") from None
    if not all(math.isfinite(v) for v in values):
        raise MetricsError(f"{flag} {text[:40]}: expected finite numbers")
    return values


# The scores each metric flag adds to a sweep's rows; a row is reused only when it holds every one asked for.
METRIC_COLUMNS = {"kid": ("kid", "kid_std_error"), "pr": ("precision", "recall"),
                  "inception_score": ("inception_score", "inception_score_std")}
SAMPLING_FLAGS = ("class_label", "masks", "prompt", "prompts", "text_encoder", "guidance_interval")
MAX_TABLE_BYTES = 1 << 26       # a sweep.json of thousands of cells is a few MB


def wanted_scores(args) -> list[str]:
    return ["fid", *(c for flag, columns in METRIC_COLUMNS.items() if getattr(args, flag) for c in columns)]


def cell_key(ev: Evaluator, reference: dict, folder: Path, args, steps: int, scale: float, count: int) -> str:
    """The identity of a cell's scores (issue 21, rule 1): the reference, the extractor and the samples (the
    request sample.py recorded in the folder: the model's weights' checksum, sampler, steps, guidance, seed, count and
    conditions, and the sweep's own sampling flags)."""
    try:
        request = durable.read_json(folder / "request.json")
    except ValueError:
        request = None
    sampling = {"unet": args.unet, "steps": steps, "cfg_scale": scale, "seed": args.seed,
                "num_samples": args.num_samples, "count": count,
                **{flag: getattr(args, flag) for flag in SAMPLING_FLAGS}}
    return durable.fingerprint({"reference": reference, "extractor": ev.identity(),
                                "request": request, "sampling": sampling})


def flag_values(value) -> list:
    """A sampling flag's value as sample.py's arguments: one word, or one per number (--guidance-interval)."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def reusable(row, key: str, wanted: list[str], count: int) -> Optional[dict]:
    """An earlier row of a cell, when it scored the same inputs (``key``) and holds every score ``wanted``."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if (isinstance(row, dict) and row.get("key") == key and row.get("num_samples") == count
            and number(row.get("steps")) and number(row.get("cfg_scale")) and all(number(row.get(c)) for c in wanted)
            and math.isfinite(row["fid"])):
        return row
    return None


def run_sweep(ev: Evaluator, args, opened: Optional[NpzReference]) -> None:
    import sample
    steps = sweep_list(args.steps, int, "--steps")
    scales = sweep_list(args.cfg_scales, float, "--cfg-scales")
    lengths = posthoc.parse_lengths(args.ema_lengths, "--ema-lengths") if args.ema_lengths else []
    wanted = wanted_scores(args)
    out = Path(args.out)
    # (EMA length, model folder): the run's own export, or each post-hoc EMA length reconstructed into OUT/models
    models = [(s, str(out / "models" / posthoc.export_name(s))) for s in lengths] or [(None, args.unet)]
    reference = ev.reference(args.ref, opened)
    identity = reference.identity()
    table_path = out / "sweep.json"
    done, lock, problem = {}, None, None
    if ev.state.is_main_process:            # before anything is sampled: the resolution, then the folder
        try:
            size = read_network_export(find_model_folder(args.unet, "unet_ema")).config.data.image_size
            problem = resolution_problem((size, size), reference.source_size, args.ref, args.allow_other_resolution)
            if problem is None:
                lock = durable.claim_output(out, "sweep")
                done = read_table(table_path)
                if lengths:
                    posthoc.export_reconstructions(args.unet, lengths, out / "models")
        except UserError as e:
            problem = str(e)
    problem = from_main_process(problem, ev.state)      # every process gets the verdict, so none waits alone
    if problem:
        if lock is not None:
            lock.release()
        raise MetricsError(problem)
    try:
        rows = []
        for (length, unet), scale in itertools.product(models, scales):
            for n in steps:
                name = f"steps_{n}_cfg_{scale:g}" if length is None else f"ema_{length:g}_steps_{n}_cfg_{scale:g}"
                folder = out / "samples" / name
                sample.main(["--unet", unet, "--out", str(folder), "--num-samples", str(args.num_samples),
                             "--steps", str(n), "--cfg-scale", str(scale), "--seed", str(args.seed),
                             "--batch-size", str(args.sample_batch_size),
                             *(f for flag in SAMPLING_FLAGS if getattr(args, flag) is not None
                               for f in (f"--{flag.replace('_', '-')}", *map(str, flag_values(getattr(args, flag)))))])
                ev.state.wait_for_everyone()    # the main process writes the manifest after the others are done
                images = list_images(folder)    # --num-samples, one per mask, or --num-samples per prompt
                key, row = None, None
                if ev.state.is_main_process:
                    key = cell_key(ev, identity, folder, args, n, scale, len(images))
                    row = reusable(done.get(name), key, wanted, len(images))
                if from_main_process(row is not None, ev.state):     # scored by an earlier sweep, the same inputs
                    rows.append(row)
                    continue
                samples = ev.features(images, probabilities=args.inception_score)
                scores = ev.scores(samples, reference, args.kid, args.pr, args.inception_score)
                if ev.state.is_main_process:
                    row = {"key": key, **({"ema_length": length} if length is not None else {}), "steps": n,
                           "cfg_scale": scale, "reference": args.ref, "source_size": samples.source_size,
                           **scores}
                    rows.append(row)
                    done[name] = row
                    write_text(table_path, json.dumps(done, indent=1) + "\n",
                               f"the samples in {folder} are complete: the same command again scores them")
                ev.state.wait_for_everyone()
        if ev.state.is_main_process:
            write_sweep_report(out, rows, args, reference, wanted)
            log_sweep(args.log_to, rows, out / "sweep.png")
    finally:
        if lock is not None:
            lock.release()


def read_table(path: Path) -> dict:
    """The scores earlier sweeps saved in ``sweep.json`` (empty when there is none)."""
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_TABLE_BYTES:
        raise MetricsError(f"{path}: {path.stat().st_size} bytes, not a sweep table (at most {MAX_TABLE_BYTES}); "
                           "remove it to score every cell again")
    try:
        table = durable.read_json(path)
    except ValueError as e:
        raise MetricsError(f"{path}: not a readable sweep table ({e}); remove it to score every cell again") from None
    if not isinstance(table, dict) or not all(isinstance(r, dict) and "num_samples" in r for r in table.values()):
        raise MetricsError(f"{path}: not a sweep table; remove it to score every cell again")
    return table


def write_text(path: Path, text: str, kept: str) -> None:
    """``path`` written atomically; a failed write (a full disk) is one line saying what is ``kept``."""
    durable.write_or_fail(lambda: durable.write_file(path, text), str(path), kept)


def write_sweep_report(out: Path, rows: list[dict], args, reference: Reference, wanted: list[str]) -> None:
    lengths = ["ema_length"] if any("ema_length" in row for row in rows) else []     # --ema-lengths
    columns = [*lengths, "steps", "cfg_scale", "fid"] + [c for c in ("kid", "precision", "recall", "inception_score")
                                                          if c in wanted]
    count = rows[0]["num_samples"]
    lines = [f"Sweep of {args.unet}: {count} samples per cell against {args.ref} "
             f"({size_text(reference.source_size) if reference.source_size else 'resolution not recorded'})", "",
             *markdown_table(columns, [[row[c] for c in columns] for row in rows])]
    if lengths:
        lines.append("")
        for n in sorted({row["steps"] for row in rows}):
            best = min((row for row in rows if row["steps"] == n), key=lambda row: row["fid"])
            lines.append(f"- best EMA length at {n} step(s): sigma_rel {best['ema_length']:g} (cfg "
                         f"{best['cfg_scale']:g}, FID {best['fid']:.4g})")
    kept = f"{out / 'sweep.json'} holds every score: the same command again writes the report without sampling"
    write_text(out / "sweep.md", "\n".join(lines) + "\n", kept)
    series = {}
    for row in rows:
        label = f"cfg {row['cfg_scale']:g}" + (f", sigma_rel {row['ema_length']:g}" if lengths else "")
        series.setdefault(label, []).append((math.log2(row["steps"]), row["fid"]))
    title = f"FID-{count // 1000 or count}{'k' if count >= 1000 else ''}"
    ticks = {math.log2(s): str(s) for s in sorted({r["steps"] for r in rows})}
    durable.write_or_fail(lambda: line_plot(series, out / "sweep.png", title=f"{title} against sampling steps",
                                    x_label="steps (log2)", y_label="FID", x_ticks=ticks), str(out / "sweep.png"), kept)
    print("\n".join(lines))


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    state = process_state()
    try:
        opened = preflight(args)
        ev = Evaluator(args, state)
        ev.check_width(opened, args.folder if args.command == "stats" else
                       args.ref if args.command == "sweep" else args.reference)
        {"stats": run_stats, "fid": run_scores, "metrics": run_scores, "sweep": run_sweep}[args.command](ev, args,
                                                                                                          opened)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finish(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
