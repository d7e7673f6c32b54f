"""The training output folder: created once, holding one run, its resolved config saved.

A folder that already holds checkpoints belongs to a run: only ``--resume`` may continue it,
and only with the same model config (checked here, before any state is loaded).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from accelerate import Accelerator

from modules.config_io import changes_in, read_json, save_json, to_dict
from modules.errors import CheckpointError

CONFIG_NAME = "config.json"


def prepare_output_dir(accelerator: Accelerator, output_dir: Path, run_config, resume: Optional[str],
                       model_sections: tuple[str, ...]) -> None:
    """Create the run folder and save the resolved config; refuse to mix two runs in one folder.

    A resumed run must build the same network as the one it continues: a change in
    ``model_sections`` of the config is refused, naming the fields, before any state is loaded.
    """
    config_path = output_dir / CONFIG_NAME
    if resume and config_path.is_file():
        changed = changes_in(read_json(config_path, CheckpointError), to_dict(run_config), model_sections)
        if changed:
            raise CheckpointError(f"cannot resume {output_dir}: its checkpoints were made with another model "
                                  f"config ({'; '.join(changed)})")
    # Checks run on every process (each raises alike), so no process is left waiting at a barrier.
    if any((output_dir / "checkpoints").glob("step_*")) and not resume:
        raise CheckpointError(f"output dir {output_dir} already holds checkpoints; "
                              "pass --resume latest to continue it or choose another --output-dir")
    if accelerator.is_main_process:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            save_json(run_config, config_path)
        except OSError as e:
            raise CheckpointError(f"cannot write to output dir {output_dir} ({e.strerror or e})") from None
    accelerator.wait_for_everyone()
