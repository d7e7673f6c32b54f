"""The training output folder: one run at a time, never mixed with another run's work.

:func:`claim_output_dir` runs first, before any data or model is touched: it claims the folder for
a run (``modules.durable.claim_output``: created, proven writable, marked as output so no data scan
reads it, and locked with an OS lock on ``.lock`` that the run holds until it ends), so a second
run on the same folder is refused while the first lives, and a lock left by a killed run never
blocks (the kernel drops it with the process). A folder holding
checkpoints or finished exports belongs to its run: only ``--resume`` may continue it. An export
that a kill interrupted is put right before the run goes on.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

from accelerate import Accelerator

from modules import durable
from modules.config.io import save_json
from modules.errors import CheckpointError
from modules.run.accelerator import from_main_process
from modules.run.layout import CHECKPOINTS, EXPORT_FOLDERS, SWAPPED_FOLDERS

CONFIG_NAME = "config.json"
LOCK_NAME = ".lock"


def _take_lock(output_dir: Path) -> tuple[Optional[durable.Lock], Optional[str]]:
    """(the lock, None) when the folder is claimed for this run, or (None, why not)."""
    try:
        return durable.claim_output(output_dir, "run", LOCK_NAME), None
    except CheckpointError as e:
        return None, str(e)


@contextlib.contextmanager
def claim_output_dir(accelerator: Accelerator, output_dir: Path, resume: Optional[str]) -> Iterator[None]:
    """Hold ``output_dir`` for this run (main process), refusing what would mix two runs.

    Every process gets the same verdict, so none is left waiting at a barrier.
    """
    lock, problem = None, None
    if accelerator.is_main_process:
        lock, problem = _take_lock(output_dir)
        if problem is None:
            for name in SWAPPED_FOLDERS:
                durable.recover_folder(output_dir / name)
            if not resume:
                problem = _owned_by_another_run(output_dir)
    verdict = from_main_process(problem, accelerator)
    try:
        if verdict:
            raise CheckpointError(verdict)
        yield
    finally:
        if lock is not None:
            lock.release()


def _owned_by_another_run(output_dir: Path) -> Optional[str]:
    if any((output_dir / CHECKPOINTS).glob("step_*")):
        return (f"output dir {output_dir} already holds checkpoints; pass --resume latest to continue it "
                "or choose another --output-dir")
    exports = [name for name in EXPORT_FOLDERS if (output_dir / name / CONFIG_NAME).is_file()]
    if exports:
        return (f"output dir {output_dir} holds the finished exports of another run ({', '.join(exports)}/); "
                "choose another --output-dir, or pass --resume latest to continue that run")
    return None


def save_run_config(accelerator: Accelerator, output_dir: Path, run_config) -> None:
    """Save the resolved config (derived fields included) as ``OUTPUT_DIR/config.json``."""
    if accelerator.is_main_process:
        try:
            save_json(run_config, output_dir / CONFIG_NAME)
        except OSError as e:
            raise CheckpointError(f"cannot write to output dir {output_dir} ({e.strerror or e})") from None
    accelerator.wait_for_everyone()
