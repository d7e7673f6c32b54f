"""The run harness: the output folder and its lock, the Accelerator, the optimizer step, checkpoints
and resume, stop signals, bad-step counting, exports of our model folders, tracking, sample folders.

Rule: everything a run must survive lives here, behind :class:`modules.run.harness.Run`, so the
training scripts keep only the forward, backward and update in view. Writes go through
modules/durable.py.
"""
