"""The errors a user's input or environment can cause, each printed by ``modules.config.cli.run_cli`` as
one ``error: ...`` line naming the problem (file, key, value) instead of a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message says what and where."""


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used; the message names it."""


class DataError(UserError, ValueError):
    """The data cannot be used for training; the message names the path or file."""


class ModelFolderError(UserError, ValueError):
    """A model folder that is missing, incomplete or of the wrong kind."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or run folder that cannot be written or resumed from."""


class OutputError(CheckpointError):
    """An output (a run's folder, a sample folder, a sweep, a latent store, any durable write) that cannot be
    claimed, locked or written. A CheckpointError too, so that callers that catch either keep working."""


class MetricsError(UserError, ValueError):
    """Unusable metric input (folder, image, statistics file, weights); the message names it."""


class TrainingAborted(UserError, RuntimeError):
    """Training stopped on purpose (e.g. too many non-finite steps); state was saved. Exit code 3."""
