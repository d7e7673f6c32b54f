"""The command line shared by every entry point: training flags, config resolution, one-line errors.

Every script's ``main(argv)`` raises :class:`modules.errors.UserError` subclasses for problems of the user's
input or environment; :func:`run_cli` prints them as one ``error: ...`` line (exit 2, or 3 for
an aborted run) instead of a traceback.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from modules.config.io import load_config, read_json
from modules.errors import ConfigError, TrainingAborted, UserError

TRACKERS = ("wandb", "tensorboard", "mlflow", "none")
logger = logging.getLogger(__name__)


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags of both training scripts (SPEC section 8)."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog="Trailing key=value words override config fields, e.g. train.lr=2e-4 model.base_channels=64.")
    parser.add_argument("--config", default=None, help="preset name in configs/<stage>/ or a JSON file")
    parser.add_argument("--data", default=None, help="image folder, save_to_disk folder or hub dataset name")
    parser.add_argument("--output-dir", required=True, help="run folder: config, checkpoints, exports, logs")
    parser.add_argument("--max-steps", default=None,
                        help="optimizer steps (overrides train.max_steps, and is bounded like it)")
    parser.add_argument("--resume", default=None,
                        help="'latest' (newest valid checkpoint in the output dir, if any) or a checkpoint folder")
    parser.add_argument("--report-to", default="wandb", choices=TRACKERS, help="experiment tracker")
    parser.add_argument("--tracker-project", default=None,
                        help="the tracker's project (W&B project; TensorBoard: the folder under logs/); default "
                             "$WANDB_PROJECT for wandb, else ldm-vae / ldm-unet. A resumed run keeps its own")
    parser.add_argument("--tracker-entity", default=None,
                        help="W&B entity (user or team); default $WANDB_ENTITY, else your default entity")
    parser.add_argument("--tracker-run-name", default=None,
                        help="the run's name in the tracker; default $WANDB_NAME, else the output dir's name")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def resolve_run_config(args: argparse.Namespace, cls, stage: str):
    """Preset + overrides + command-line flags; when resuming, the saved config is the base."""
    if not args.output_dir.strip():
        raise ConfigError(f"--output-dir {args.output_dir!r}: empty (an empty path would be the current directory); "
                          "name the run's folder")
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    saved = Path(args.output_dir) / "config.json"
    if args.resume and args.config is not None and saved.is_file():
        try:
            read_json(saved)
        except ConfigError as e:
            logger.warning("%s; it is replaced by the config of this run (--config %s)", e, args.config)
    if args.resume and args.config is None:
        if not saved.is_file():
            raise ConfigError(f"--resume {args.resume}: {args.output_dir} has no config.json to continue from; "
                              "pass --config (the preset the run was started with)")
        return load_config(cls, stage, str(saved), overrides, run_folder=Path(args.output_dir))
    return load_config(cls, stage, args.config, overrides)


def run_cli(main: Callable[[Optional[list[str]]], object], argv: Optional[list[str]] = None) -> None:
    """Run a script's main; expected user errors print one line instead of a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, TrainingAborted) else 2)
