"""The names inside a training run's output folder, for everything that must recognise them.

A run writes its exports (``vae/`` in stage 1; ``unet/`` and ``unet_ema/`` in stage 2, each one model
folder), a stage-2 run its own copy of its VAE (``frozen_vae/``, so its exports stay usable if that VAE
trains on), its checkpoints (``checkpoints/step_N``), with ``ema.posthoc`` its power-function EMA
snapshots (``posthoc_ema/``, modules/run/posthoc.py) and, when it reports to a tracker, where it
reports (``tracker.json``: the project, the W&B run id a resume continues, the step of the last export).
"""
EXPORT_FOLDERS = ("vae", "unet", "unet_ema")
FROZEN_VAE = "frozen_vae"
CHECKPOINTS = "checkpoints"
TRACKER_RECORD = "tracker.json"
TRACKER_LOGS = "logs"                               # TensorBoard: logs/<project>/
POSTHOC_SNAPSHOTS = "posthoc_ema"
SWAPPED_FOLDERS = (*EXPORT_FOLDERS, FROZEN_VAE)     # written by durable.write_folder: recovered at start
RUN_OWNED = (*SWAPPED_FOLDERS, CHECKPOINTS, POSTHOC_SNAPSHOTS)   # what a run (re)writes, deleting anything else put there
