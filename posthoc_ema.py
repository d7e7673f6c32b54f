"""Post-hoc EMA (EDM2): the EMA of any length, rebuilt after training from a run's power-function EMA snapshots.

    python posthoc_ema.py runs/unet --sigma-rels 0.15                  # -> runs/unet/unet_phema_0.15/
    python posthoc_ema.py runs/unet --sigma-rels 0.05,0.1,0.2 --out runs/unet/phema
    python sample.py --unet runs/unet/unet_phema_0.15 --out samples --steps 1

The run must have trained with ``ema.posthoc=true`` (its ``posthoc_ema/`` snapshots). Each length is
exported as a model folder ``unet_phema_<sigma_rel>`` that sample.py and evaluate.py read, made at the
time of the newest snapshot (``--step``: an earlier one). sigma_rel is the EMA's length relative to
the training time (EDM2's best: about 0.05 to 0.15); ``evaluate.py sweep --ema-lengths``
scores several. One process on the CPU: it checks every snapshot's digest, then reads each once.
"""
from __future__ import annotations

import argparse
from typing import Optional

from modules.config.cli import run_cli
from modules.config.schema import STEP_LIMIT
from modules.errors import ConfigError
from modules.interop.dit import diffusers_dit_writer
from modules.run.posthoc import export_reconstructions, parse_lengths, rebuild_index, snapshots_folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a train_unet.py output dir trained with ema.posthoc=true")
    p.add_argument("--sigma-rels", help="EMA lengths to reconstruct, comma-separated (e.g. 0.05,0.1,0.15)")
    p.add_argument("--out", default=None, help="folder for the unet_phema_<sigma_rel>/ model folders (default: RUN)")
    p.add_argument("--step", type=int, default=None, help="reconstruct at the snapshots of this step (default: the "
                   "newest)")
    p.add_argument("--skip-damaged", action="store_true", help="leave missing or damaged snapshots out (the fit is "
                   "coarser) instead of stopping")
    p.add_argument("--rebuild-index", action="store_true", help="list the snapshots again from their files, when "
                   "posthoc_ema/index.json is damaged (their content then goes unchecked)")
    return p


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.step is not None and not 1 <= args.step <= STEP_LIMIT:
        raise ConfigError(f"--step {args.step}: must be a step from 1 to {STEP_LIMIT}")
    if args.rebuild_index:
        print(f"listed {len(rebuild_index(args.run))} snapshot(s) in {snapshots_folder(args.run)}")
    if args.sigma_rels is None:
        if not args.rebuild_index:
            raise ConfigError("--sigma-rels: give the EMA lengths to reconstruct (e.g. 0.05,0.1,0.15)")
        return
    lengths = parse_lengths(args.sigma_rels, "--sigma-rels")
    for folder in export_reconstructions(args.run, lengths, args.out, args.step, args.skip_damaged,
                                         diffusers_dit_writer):
        print(folder)


if __name__ == "__main__":
    run_cli(main)
