"""Publish an export on the Hugging Face Hub: its weights, config, diffusers copy and model card.

    python publish.py --model runs/unet --repo user/my-dit [--private] [--scores runs/unet/sweep/sweep.json]
    python publish.py --model runs/vae --repo user/my-vae --license mit
    python publish.py --model runs/unet --out hub_folder          # the folder only, nothing uploaded

``--model`` is an export (``unet_ema/``, ``unet/``, ``vae/``) or a training output dir (its ``unet_ema/``, or
``vae/``). What is uploaded is what a fresh export holds, checked first: the export's files (its weights against
the checksum its config.json recorded), a ``diffusers/`` copy where diffusers has the model (written now for an
export made before they were), and the model card README.md, written now with the repository's name, the
license and the scores of an ``evaluate.py sweep`` (``--scores``: its sweep.json, whose samples must say they
were drawn from this export). A stage-2 export also carries the VAE it was trained with in ``vae/`` (``--vae``
to give it when the record does not find it), so ``sample.py --unet NAME --vae NAME/vae`` works from a download.
The repository is created when missing (``--private``); the upload is one commit (``HfApi.upload_folder``),
with the token ``hf auth login`` saved.
"""
from __future__ import annotations

import argparse
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from modules import durable
from modules.config.cli import run_cli
from modules.core.compiling import without_compiled_prefix
from modules.errors import ConfigError, ModelFolderError, UserError
from modules.interop.dit import diffusers_dit_writer
from modules.interop.vae import load_vae
from modules.run.export import (CONFIG_NAME, DIFFUSERS_FOLDER, WEIGHTS_NAME, diffusers_vae_config, find_model_folder,
                                model_card, read_config, read_folder_weights, read_network_export, training_vae,
                                vae_identity, weights_digest, write_diffusers_folder)
from modules.run.model_card import CARD_NAME, DEFAULT_LICENSE

logger = logging.getLogger("publish")
VAE_FOLDER = "vae"          # where a stage-2 repository holds the VAE it was trained with
MAX_SCORES_BYTES = 1 << 26


class PublishError(UserError):
    """The export cannot be published as asked; the message says why."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an export folder, or a training output dir")
    parser.add_argument("--repo", default=None, help="the Hub repository, user/name (omitted: --out only)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--license", default=DEFAULT_LICENSE,
                        help=f"the card's license id (default {DEFAULT_LICENSE!r}: set the real one)")
    parser.add_argument("--scores", default=None, help="an evaluate.py sweep's sweep.json of this export")
    parser.add_argument("--vae", default=None, help="the VAE a stage-2 export was trained with (default: its record)")
    parser.add_argument("--out", default=None, help="also keep the folder as uploaded here (a new folder)")
    return parser


def checked_export(folder: Path) -> dict:
    """The export's config.json, after its weights are checked against the digest it recorded."""
    config = read_config(folder)
    if config.get("kind") not in ("vae", "unet"):
        raise ModelFolderError(f"{folder}: {CONFIG_NAME} is not an export of this toolkit (kind 'vae' or 'unet')")
    recorded = weights_digest(config)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelFolderError(f"{folder}: no {WEIGHTS_NAME}")
    if recorded and not durable.digest_matches(weights, recorded):
        raise ModelFolderError(f"{weights}: its checksum is not the one config.json recorded: the file is damaged "
                               "or was replaced; export again")
    return config


def read_scores(path: Path, export: dict) -> list[dict]:
    """The rows of an evaluate.py sweep table whose samples' records say they were drawn from ``export`` (a
    sweep's cells of other models, its post-hoc EMA lengths, are left out, saying so; none left is an error)."""
    if not path.is_file() or path.stat().st_size > MAX_SCORES_BYTES:
        raise PublishError(f"--scores {path}: not an evaluate.py sweep.json (missing, or over "
                           f"{MAX_SCORES_BYTES} bytes)")
    try:
        table = durable.read_json(path)
    except ValueError as e:
        raise PublishError(f"--scores {path}: not readable JSON ({e})") from None
    if not isinstance(table, dict) or not table:
        raise PublishError(f"--scores {path}: not an evaluate.py sweep table (cell name -> scores)")
    rows, others, digest = [], [], weights_digest(export)
    for name, row in sorted(table.items(), key=lambda item: str(item[0])):
        fid = row.get("fid") if isinstance(row, dict) else None
        if not isinstance(fid, (int, float)) or isinstance(fid, bool) or not math.isfinite(fid):
            raise PublishError(f"--scores {path}: cell '{name}' holds no finite 'fid': not a sweep table")
        request = path.parent / "samples" / str(name) / "request.json"
        try:
            drawn_from = durable.read_json(request).get("unet_weights") if request.is_file() else None
        except (ValueError, AttributeError):
            drawn_from = None
        if drawn_from is None:
            logger.warning("--scores: %s is gone or unreadable; the scores of cell '%s' are published unchecked",
                           request, name)
        elif drawn_from != digest:
            others.append(name)
            continue
        rows.append({k: v for k, v in row.items() if k != "key"})
    if others and not rows:
        raise PublishError(f"--scores {path}: no cell was sampled from this export (cell '{others[0]}' records other "
                           "weights in its request.json); give the sweep of this export")
    if others:
        logger.warning("--scores: %d cell(s) sampled from other models left out (%s)", len(others),
                       ", ".join(others[:5]))
    return sorted(rows, key=lambda r: (r.get("ema_length", 0), r.get("cfg_scale", 0), r.get("steps", 0)))


def copy_export(source: Path, target: Path, config: dict, scores: Optional[list[dict]], repo: Optional[str],
                license: str) -> None:
    """``source``'s files into ``target``, a ``diffusers/`` copy written where it lacks one and diffusers has
    the model, and the model card written for the repository."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.relative_to(source) != Path(CARD_NAME):
            durable.link_or_copy(path, target / path.relative_to(source))
    if (source / DIFFUSERS_FOLDER / CONFIG_NAME).is_file():
        why_not = None
    elif config["kind"] == "vae":
        model = load_vae(source)
        theirs = diffusers_vae_config(model.config)
        why_not = f"model.resample={model.config.resample} has no diffusers counterpart" if theirs is None else None
        if theirs is not None:
            write_diffusers_folder(target / DIFFUSERS_FOLDER, theirs, source / WEIGHTS_NAME)
    else:
        export = read_network_export(source)
        weights = without_compiled_prefix(read_folder_weights(source, config))
        why_not = diffusers_dit_writer(export.config, export.sizes)(target, weights)
    (target / CARD_NAME).write_text(model_card(config, why_not, scores, repo, license))


def stage(args, folder: Path, target: Path) -> None:
    """Build the repository's contents in ``target`` (a new folder)."""
    config = checked_export(folder)
    scores = read_scores(Path(args.scores), config) if args.scores else None
    if scores and config["kind"] == "vae":
        raise PublishError("--scores: a sweep scores a stage-2 model's samples, and this is a VAE")
    copy_export(folder, target, config, scores, args.repo, args.license)
    if config["kind"] == "unet":
        export = read_network_export(folder)
        vae_folder = find_model_folder(args.vae or training_vae(folder, export.vae), "vae")
        recorded = export.vae.get("identity")
        if recorded and vae_identity(load_vae(vae_folder)) != recorded:
            raise PublishError(f"{vae_folder} is not the VAE {folder} was trained with (its identity differs from "
                               "the recorded one); pass that VAE as --vae")
        copy_export(vae_folder, target / VAE_FOLDER, checked_export(vae_folder), None, None, args.license)


def publish(api: HfApi, args, target: Path) -> str:
    """Create the repository when missing and upload ``target`` in one commit; returns the commit's URL."""
    try:
        api.create_repo(args.repo, private=args.private or None, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=args.repo, folder_path=str(target), repo_type="model",
                                 commit_message=f"Upload {Path(args.model).name} with publish.py")
    except (HfHubHTTPError, OSError) as e:
        raise PublishError(f"the Hub refused {args.repo}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                           " (log in with `hf auth login`; check the name and your rights)") from None
    return str(getattr(info, "commit_url", info))


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.repo and not args.out:
        raise ConfigError("give --repo user/name to publish, or --out FOLDER to write the folder only")
    if args.repo:
        try:
            validate_repo_id(args.repo)
        except HFValidationError as e:
            raise ConfigError(f"--repo {args.repo}: not a Hub repository name ({e})") from None
    if args.out and Path(args.out).exists():
        raise ConfigError(f"--out {args.out}: already exists; give a new folder")
    model = Path(args.model)
    folder = find_model_folder(model, "unet_ema" if (model / "unet_ema" / CONFIG_NAME).is_file() else "vae")
    # beside the export, so its files are hard-linked rather than copied
    with tempfile.TemporaryDirectory(prefix=".publish_", dir=folder.parent) as tmp:
        target = Path(tmp) / "repo"
        target.mkdir()
        stage(args, folder, target)
        if args.out:
            durable.write_folder(Path(args.out), lambda out: shutil.copytree(target, out, dirs_exist_ok=True))
            logger.info("wrote %s", args.out)
        if args.repo:
            url = publish(HfApi(), args, target)
            logger.info("published %s as %s (%s)", folder, args.repo, url)


if __name__ == "__main__":
    run_cli(main)
